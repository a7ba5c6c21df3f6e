# One image for the API and the GPU workers (docker-compose.yml picks the command).
# PyTorch's CUDA wheels bring their own CUDA libraries; the host needs the NVIDIA driver and container toolkit.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN useradd --create-home --uid 10001 peeraid

COPY pyproject.toml README.md alembic.ini ./
COPY models models
COPY core core
COPY api api
COPY worker worker
COPY service service
COPY bench bench
COPY migrations migrations
# the service in place (editable), as `make install` does: it reads alembic.ini and migrations/ beside its packages
RUN pip install "torch==2.14.1" "torchvision==0.29.1" && pip install ./models -e ".[service]"

USER peeraid
ENV PEERAID_DATA_DIR=/data PEERAID_API_HOST=0.0.0.0
EXPOSE 8000
CMD ["peeraid-service", "api"]
