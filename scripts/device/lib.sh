# Shared by the device scripts (source it after setting OUT): the Python to use and a time-budgeted step runner.
#   PY          python, or python3 where there is no `python` (PY or PYTHON override)
#   BUDGET      seconds for all steps: BUDGET_S, else SCRIPT_BUDGET (set by all.sh) less 3 s for the summary, else
#               the script's default, passed as $1 to budget_start
#   step CAP_S CMD...   runs CMD under `timeout min(CAP_S, time left)`; skipped (exit 124) when under 5 s are left
PY="${PY:-${PYTHON:-$(command -v python || command -v python3)}}"

budget_start() {
  BUDGET="${BUDGET_S:-$1}"
  [ -z "${BUDGET_S:-}" ] && [ -n "${SCRIPT_BUDGET:-}" ] && BUDGET=$((SCRIPT_BUDGET - 3))
  deadline=$((SECONDS + BUDGET))
}

step() {
  local cap=$1; shift
  local left=$((deadline - SECONDS))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 5 ]; then echo "   skipped (out of the time budget)"; return 124; fi
  timeout -k 3 "$cap" "$@"
}

# A step runner that also keeps a table (the vajra scripts):
#   table_start BUDGET_S RESERVE_S TAIL_LINES   then   table_step NAME CAP_S LOG CMD...
# runs CMD under min(CAP_S, budget left - RESERVE_S) with its output in LOG, skipped under 10 s; rows[] gets one
# line per step, status becomes 1 when a step fails; left prints the seconds left.
table_start() {
  BUDGET=$1; RESERVE=$2; TAIL_LINES=$3
  T0=$(date +%s); status=0; rows=()
}

left() { echo $(( BUDGET - RESERVE - ($(date +%s) - T0) )); }

table_step() {
  local name=$1 cap=$2 log=$3; shift 3
  local lim; lim=$(left); [ "$lim" -gt "$cap" ] && lim=$cap
  if [ "$lim" -lt 10 ]; then
    rows+=("$(printf '%-26s %-8s %4s s / %3s s' "$name" "skipped" 0 "$lim")"); return 99
  fi
  local s; s=$(date +%s)
  timeout -k 5 "$lim" "$@" > "$log" 2>&1
  local rc=$?
  local what=ok
  [ $rc -ne 0 ] && what="rc=$rc" && status=1
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && what=TIMEOUT
  rows+=("$(printf '%-26s %-8s %4s s / %3s s  %s' "$name" "$what" $(( $(date +%s) - s )) "$lim" \
            "$(grep -E 'passed|failed|error|skipped|checks' "$log" | tail -1 | cut -c1-60)")")
  echo "== $name: $what"; tail -n "$TAIL_LINES" "$log"
  return $rc
}

# The kvstitch scripts' text: $KVSTITCH_DATA, else tinyshakespeare.txt in .devdata/, shared/data/ or
# ../shared/data/ (prints nothing where none is found)
kvstitch_data() {
  if [ -n "${KVSTITCH_DATA:-}" ]; then echo "$KVSTITCH_DATA"; return; fi
  local d
  for d in .devdata/tinyshakespeare.txt shared/data/tinyshakespeare.txt ../shared/data/tinyshakespeare.txt; do
    if [ -f "$d" ]; then echo "$d"; return; fi
  done
}
