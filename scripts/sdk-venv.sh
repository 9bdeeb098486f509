# Sourced by the openai-SDK scripts: sets `py` to a Python that has the openai SDK, making the
# venv (`ITAMAE_SDK_VENV`, default ~/.cache/itamae/sdkvenv) from PyPI the first time.
venv="${ITAMAE_SDK_VENV:-$HOME/.cache/itamae/sdkvenv}"
py="$venv/bin/python"
if [ ! -x "$py" ] || ! "$py" -c 'import openai' 2>/dev/null; then
  echo "setting up the SDK venv at $venv (openai from PyPI) ..."
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q openai
fi
"$py" -c 'import openai; print("openai SDK", openai.__version__)'
