# Shared by the device scripts (source it after setting OUT): the Python to use and a time-budgeted step runner.
#   PY          python, or python3 where there is no `python` (PYTHON overrides)
#   BUDGET      seconds for all steps (BUDGET_S overrides the script's default, passed as $1 to budget_start)
#   step CAP_S CMD...   runs CMD under `timeout min(CAP_S, time left)`; skipped (exit 124) when under 5 s are left
PY="${PYTHON:-$(command -v python || command -v python3)}"

budget_start() {
  BUDGET="${BUDGET_S:-$1}"
  deadline=$((SECONDS + BUDGET))
}

step() {
  local cap=$1; shift
  local left=$((deadline - SECONDS))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 5 ]; then echo "   skipped (out of the time budget)"; return 124; fi
  timeout -k 3 "$cap" "$@"
}
