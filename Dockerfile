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

COPY . .
# The project, editable, with tune.py's and plot.py's extras, and DLLogger at a fixed commit (its 1.0.0).
# The constraint keeps the image's CUDA build of torch: an image whose torch is older than the project
# needs fails here rather than swapping in a wheel from PyPI.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/image-torch.txt \
 && pip install --no-cache-dir -c /tmp/image-torch.txt -e ".[tune,plots]" \
        "dllogger @ git+https://github.com/NVIDIA/dllogger@0540a43971f4a8a16693a9de9de73c1072020769" \
 && rm /tmp/image-torch.txt \
 && chmod +x ./*.sh
