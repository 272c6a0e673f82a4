#!/usr/bin/env bash
# Build (once) the separate virtual environment that runs SGLang servers.
#
# SGLang pins its own (CUDA) build of torch, so it cannot share the trainer's environment. This
# script creates a venv with sglang==$HPT_SGLANG_VERSION (plus sglang-router, the load balancer
# that rollout.sglang.router starts in front of several servers) and replaces SGLang's compiled kernel
# package (sgl_kernel) with the pure-torch stand-in shipped in
# hpt_megatron/rollout/sglang/kernel_standin/, which is what lets the server run on CPU
# (docs/architecture.md (What runs where)). The heavy install is cached: a stamp file records what was installed, so
# a second run only re-checks and re-copies the stand-in (a few seconds). Every package's bytecode
# is compiled once at install (see compile_bytecode).
#
# Usage:  bash tools/sglang_env.sh            # prints the venv's python on the last line
# Env:    HPT_SGLANG_VENV     venv path (default /opt/hpt-sglang-venv)
#         HPT_SGLANG_VERSION  sglang version (default 0.5.23)
#         HPT_SGLANG_ROUTER_VERSION  sglang-router version (default 0.3.2, the newest on PyPI
#                             that installs next to sglang 0.5.23; added to a cached venv)
#         HPT_SGLANG_FORCE=1  reinstall even when the stamp matches
set -euo pipefail

VENV="${HPT_SGLANG_VENV:-/opt/hpt-sglang-venv}"
SGLANG_VERSION="${HPT_SGLANG_VERSION:-0.5.23}"
ROUTER_VERSION="${HPT_SGLANG_ROUTER_VERSION:-0.3.2}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STANDIN_SRC="$REPO_ROOT/hpt_megatron/rollout/sglang/kernel_standin"
INSTALL_STAMP="$VENV/.hpt-install-stamp"
STANDIN_STAMP="$VENV/.hpt-standin-stamp"
BYTECODE_STAMP="$VENV/.hpt-bytecode-stamp"
WANT_INSTALL="sglang==$SGLANG_VERSION python=$(python3 -c 'import sys; print(sys.version.split()[0])')"

log() { echo "[sglang_env] $*" >&2; }

standin_hash() {
    (cd "$STANDIN_SRC" && find . -name '*.py' -print0 | sort -z | xargs -0 sha256sum) | sha256sum |
        cut -d' ' -f1
}

site_packages() {
    "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

heavy_install() {
    log "installing $WANT_INSTALL into $VENV (about 11 GB, several minutes)"
    python3 -m venv "$VENV"
    # pip's machine-wide constraints (if any) are meant for the trainer's env, not this one.
    PIP_CONSTRAINT="" "$VENV/bin/pip" install --quiet --upgrade pip uv
    "$VENV/bin/uv" pip install --python "$VENV/bin/python" "sglang==$SGLANG_VERSION"
    echo "$WANT_INSTALL" >"$INSTALL_STAMP"
    rm -f "$STANDIN_STAMP"
}

router_install() {
    # Its own step (not in the heavy install's stamp): a venv built before it gets only this.
    local have
    have="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("sglang-router"))' \
        2>/dev/null || true)"
    if [[ "$have" == "$ROUTER_VERSION" ]]; then
        return 1
    fi
    log "installing sglang-router==$ROUTER_VERSION into $VENV"
    "$VENV/bin/uv" pip install --python "$VENV/bin/python" "sglang-router==$ROUTER_VERSION"
}

install_standin() {
    local sp
    sp="$(site_packages)"
    log "replacing sgl_kernel in $sp with the pure-torch stand-in"
    # Drop the compiled package (its extension modules need a CUDA driver) but keep its metadata,
    # so that sglang's own version checks still see sgl-kernel installed.
    rm -rf "$sp/sgl_kernel"
    cp -r "$STANDIN_SRC/sgl_kernel" "$sp/sgl_kernel"
    standin_hash >"$STANDIN_STAMP"
}

compile_bytecode() {
    # uv installs without bytecode, and where PYTHONDONTWRITEBYTECODE is set (as on our CI) no
    # process caches it either: every server start then compiled torch and sglang from source in
    # each of its three processes (a CPU server took 157 s to come up instead of 87). Compiled
    # once here; a few files written for newer Pythons (torch's py312 test helpers) do not compile
    # and are never imported, so compileall's status is not checked.
    local want="$WANT_INSTALL router=$ROUTER_VERSION standin=$(standin_hash)"
    if [[ "$(cat "$BYTECODE_STAMP" 2>/dev/null)" == "$want" ]]; then
        return 1
    fi
    log "compiling the venv's bytecode (once; a few minutes)"
    "$VENV/bin/python" -m compileall -q -j 0 "$(site_packages)" >/dev/null 2>&1 || true
    echo "$want" >"$BYTECODE_STAMP"
}

main() {
    mkdir -p "$(dirname "$VENV")"
    exec 9>"$VENV.lock"
    flock 9  # one builder at a time; a concurrent caller waits, then finds the stamp
    local t0=$SECONDS changed=0
    if [[ "${HPT_SGLANG_FORCE:-0}" == 1 || ! -x "$VENV/bin/python" ||
        "$(cat "$INSTALL_STAMP" 2>/dev/null)" != "$WANT_INSTALL" ]]; then
        heavy_install
        changed=1
    else
        log "cached install found ($WANT_INSTALL)"
    fi
    if router_install; then
        changed=1
    fi
    if [[ "$(cat "$STANDIN_STAMP" 2>/dev/null)" != "$(standin_hash)" ]]; then
        install_standin
        changed=1
    fi
    if compile_bytecode; then
        changed=1
    fi
    # A full import of sglang takes ~10 s: do it only after a change; otherwise a quick check.
    local check='import importlib.metadata as m; assert m.version("sglang") == "'"$SGLANG_VERSION"'"'
    check="$check; assert m.version(\"sglang-router\") == \"$ROUTER_VERSION\""
    if [[ $changed == 1 ]]; then
        check="$check; import sgl_kernel, sglang.srt.entrypoints.http_server, sglang.srt.models.qwen2"
        check="$check; import sglang_router.router"
    fi
    SGLANG_USE_CPU_ENGINE=1 "$VENV/bin/python" -c "$check" ||
        { log "import check failed in $VENV (rerun with HPT_SGLANG_FORCE=1)"; exit 1; }
    log "ready in $((SECONDS - t0)) s"
    echo "$VENV/bin/python"
}

main "$@"
