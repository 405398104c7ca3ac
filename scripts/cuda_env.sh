# Sourced by the scripts that build the CUDA extension, with PY set to the Python that builds it: exports
# CUDA_HOME and CPLUS_INCLUDE_PATH so that torch's CUDA headers compile on a machine whose toolkit is partial.
NVCC=${NVCC:-$(command -v nvcc || true)}
# nvcc may be a wrapper script outside the toolkit, and torch then guesses CUDA_HOME from its folder
if [ -z "${CUDA_HOME:-}" ] && [ -n "$NVCC" ]; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
  [ -f "$CUDA_HOME/include/cuda_runtime_api.h" ] || CUDA_HOME=/usr/local/cuda
  export CUDA_HOME
fi
# torch's headers include cusparse.h and friends, which a bare toolkit may lack; a CUDA torch wheel's nvidia
# packages ship them
_fastseg_nvidia_include=$("$PY" -c "import glob, os, sysconfig; print(':'.join(sorted(glob.glob(os.path.join(sysconfig.get_paths()['purelib'], 'nvidia', '*', 'include')))))" 2>/dev/null || true)
if [ -n "$_fastseg_nvidia_include" ]; then
  export CPLUS_INCLUDE_PATH="${_fastseg_nvidia_include}${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
fi
unset _fastseg_nvidia_include
