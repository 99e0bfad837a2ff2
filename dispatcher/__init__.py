"""The dispatcher: predict (output length), estimate (instances), select (policy), publish.

Everything here except ``service`` is the decision core: synchronous, pure CPU, no
I/O, no asyncio/aiokafka/vllm imports. The simulator drives the same objects.
"""
