# GoodServe services (dispatcher, monitor, simulated/OpenAI-backend workers, gateway).
# vLLM workers need a GPU image with vLLM installed: pip install "goodserve[vllm]".
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY goodserve ./goodserve
COPY schemas ./schemas
COPY dispatcher ./dispatcher
COPY workers ./workers
COPY monitor ./monitor
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT []
CMD ["goodserve", "--help"]
