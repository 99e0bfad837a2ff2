"""Workers, one per GPU instance: run assigned requests on an engine; publish results, heartbeats.

Workers never import the dispatcher.
"""
