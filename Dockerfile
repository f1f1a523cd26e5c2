# NCF for PyTorch on NVIDIA's NGC PyTorch image (CUDA, cuDNN, NCCL, apex and a tuned torch included).
#
#   docker build -t ncf .
#   docker run --gpus all --ipc=host -it --rm -v "$PWD/data:/data" ncf
#   (inside) ./prepare_dataset.sh ml-20m && python ncf.py --data /data/cache/ml-20m
#
# Data lives in the /data volume (DATA_ROOT), so downloads and caches outlive the container.
ARG FROM_IMAGE_NAME=nvcr.io/nvidia/pytorch:24.05-py3
FROM ${FROM_IMAGE_NAME}

ENV DATA_ROOT=/data \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /workspace/ncf

# Dependencies first, so that editing the code does not reinstall them. torch is left out of the
# requirements: the image's CUDA build of torch must not be replaced by a wheel from PyPI.
COPY requirements.txt .
RUN pip install --no-cache-dir "git+https://github.com/NVIDIA/dllogger#egg=dllogger" \
 && grep -vE '^[[:space:]]*torch([^A-Za-z0-9_.-]|$)' requirements.txt > /tmp/requirements-no-torch.txt \
 && pip install --no-cache-dir -r /tmp/requirements-no-torch.txt \
 && rm /tmp/requirements-no-torch.txt

COPY . .
RUN chmod +x ./*.sh
