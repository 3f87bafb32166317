# CUDA image with the project and faiss-gpu; the entry point is the project's CLI:
#   docker build -t protocluster .
#   docker run --gpus all -v $PWD/runs:/app/runs protocluster fit --config configs/temi.yaml
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY modules modules
COPY datamodules datamodules
COPY callbacks callbacks
COPY clustering clustering
COPY text text
COPY tools tools
COPY configs configs
COPY cli.py ./

# CUDA build of torch first; then the project, and faiss-gpu in place of faiss-cpu (both provide
# the `faiss` module, so one is removed before the other goes in).
RUN pip install torch==2.6.0 --index-url https://download.pytorch.org/whl/cu124 \
    && pip install . \
    && pip uninstall -y faiss-cpu \
    && pip install "faiss-gpu-cu12>=1.8"

ENTRYPOINT ["python", "cli.py"]
CMD ["--help"]
