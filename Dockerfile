# hpt-megatron on NVIDIA GPUs: the trainer (Megatron-core) in the NGC PyTorch image's Python, the
# SGLang rollout servers in their own virtual environment.
#
#   docker build -t hpt-megatron .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /models:/models -v $PWD/data:/workspace/hpt-megatron/data hpt-megatron \
#       torchrun --nproc_per_node 8 -m hpt_megatron.cli train examples/qwen2.5-math-7b-hpt.yaml
#
# Why two environments: SGLang 0.5.23 pins its own torch (2.14.1, CUDA 13 wheels, with
# flashinfer for cu13), which must not replace the NGC image's torch that Megatron-core,
# Transformer Engine and NVIDIA's apex are built against. The trainer starts the servers with
# $HPT_SGLANG_VENV/bin/python (hpt_megatron/config/rollout.py), so the two never share a process.
# The SGLang wheels bundle their CUDA runtime: the host driver must support CUDA 13 (R580 or
# newer); with an older driver, build with a base image and SGLang version that match it.
#
# Written without a Docker daemon at hand: the file has not been built here.

ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

ARG MEGATRON_CORE_VERSION=0.16.1
ARG SGLANG_VERSION=0.5.23
# SGLang's "all" extra only adds diffusion models, fastokens, HTTP/2 and tracing, none of which
# the rollout servers use (and diffusion pulls in a large stack); set SGLANG_EXTRAS="[all]" to
# get them anyway.
ARG SGLANG_EXTRAS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HPT_SGLANG_VENV=/opt/hpt-sglang-venv \
    HPT_CONSTRAINTS=/opt/hpt-constraints.txt

# 1. Pin what the image built: torch and everything compiled against it (Transformer Engine,
#    NVIDIA's apex, flash-attn, triton, ...). The NGC image's own pip constraint file, when it has
#    one, is kept; the freeze adds the exact versions of the packages named below. Every later
#    pip call in the trainer's Python uses these constraints, so none can replace torch. The PyPI
#    package "apex" (an unrelated project) is never installed: the image's apex is NVIDIA's.
RUN set -eux; \
    : > "$HPT_CONSTRAINTS"; \
    if [ -n "${PIP_CONSTRAINT:-}" ] && [ -f "$PIP_CONSTRAINT" ]; then \
        cat "$PIP_CONSTRAINT" >> "$HPT_CONSTRAINTS"; \
    fi; \
    python -m pip list --format=freeze \
        | grep -iE '^(torch|torchvision|torchaudio|triton|transformer[-_]engine[-_a-z0-9]*|apex|flash[-_]attn|nvidia[-_]modelopt|numpy)==' \
        >> "$HPT_CONSTRAINTS"; \
    cat "$HPT_CONSTRAINTS"; \
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# 2. Megatron-core, pinned, without letting pip touch torch.
RUN python -m pip install -c "$HPT_CONSTRAINTS" "megatron-core==${MEGATRON_CORE_VERSION}"

# 3. SGLang in its own venv (as tools/sglang_env.sh does, but with SGLang's real CUDA kernels:
#    the script's pure-torch sgl_kernel stand-in is only for CPU servers). No constraints here:
#    this environment brings its own torch.
RUN set -eux; \
    python -m venv "$HPT_SGLANG_VENV"; \
    PIP_CONSTRAINT="" "$HPT_SGLANG_VENV/bin/pip" install --upgrade pip uv; \
    PIP_CONSTRAINT="" "$HPT_SGLANG_VENV/bin/uv" pip install --python "$HPT_SGLANG_VENV/bin/python" \
        "sglang${SGLANG_EXTRAS}==${SGLANG_VERSION}"; \
    "$HPT_SGLANG_VENV/bin/python" -c \
        "import importlib.metadata as m; assert m.version('sglang') == '${SGLANG_VERSION}'"; \
    echo "sglang==${SGLANG_VERSION} python=$("$HPT_SGLANG_VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')" \
        > "$HPT_SGLANG_VENV/.hpt-install-stamp"

# 4. The project. Dependencies first (from setup.py, torch left out), so that source edits do not
#    invalidate this layer; then the package itself, editable and without dependencies.
WORKDIR /workspace/hpt-megatron
COPY setup.py pyproject.toml README.md ./
RUN python -c "import ast, pathlib, re; \
tree = ast.parse(pathlib.Path('setup.py').read_text()); \
reqs = next(ast.literal_eval(k.value) for k in ast.walk(tree) \
            if isinstance(k, ast.keyword) and k.arg == 'install_requires'); \
print('\n'.join(r for r in reqs \
                if re.split(r'[<>=!~;\[ ]', r)[0].lower() not in ('torch', 'megatron-core')))" \
        > /tmp/hpt-requirements.txt \
    && cat /tmp/hpt-requirements.txt \
    && python -m pip install -c "$HPT_CONSTRAINTS" -r /tmp/hpt-requirements.txt
COPY . .
RUN python -m pip install --no-deps -e . \
    && (python -m pip check || echo "pip check reported the conflicts above (informational)") \
    && python -c "import torch, megatron.core, hpt_megatron; \
print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)" \
    && "$HPT_SGLANG_VENV/bin/python" -c "import sglang; print('sglang', sglang.__version__)"

CMD ["bash"]
