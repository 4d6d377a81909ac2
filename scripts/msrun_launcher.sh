#!/usr/bin/env bash
# Launch a command on several workers with MindSpore's msrun (tensor-parallel inference: model_parallel = N).
#
# One node:
#   bash scripts/msrun_launcher.sh "run_mindformer.py --config ... --use_parallel True" [WORKER_NUM]
#   bash scripts/msrun_launcher.sh "CMD" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
# Several nodes (run once per node):
#   bash scripts/msrun_launcher.sh "CMD" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR \
#        JOIN CLUSTER_TIME_OUT
#
# Defaults: WORKER_NUM 8, MASTER_ADDR 127.0.0.1, MASTER_PORT 8118, LOG_DIR output/msrun_log, JOIN True,
# CLUSTER_TIME_OUT 7200. CMD is split with shell quoting rules, so a quoted multi-word prompt inside it stays
# one argument. Workers run the project's .venv python; each logs to LOG_DIR/worker_K.log. When a worker fails,
# one line names it and its log, and the exit status is the worker's (2 for bad input); Ctrl-C exits 130.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$repo_root/.venv/bin/python" ]; then
  export PATH="$repo_root/.venv/bin:$PATH"  # msrun starts workers with the python found on PATH
fi

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[ $# -ge 1 ] || usage
command_line="$1"
worker_num="${2:-8}"
local_worker="$worker_num"
master_addr="127.0.0.1"
master_port="8118"
node_rank="0"
log_dir="output/msrun_log"
join="True"
cluster_time_out="7200"

case $# in
  1|2) ;;
  6) master_port="$3"; log_dir="$4"; join="$5"; cluster_time_out="$6" ;;
  10) local_worker="$3"; master_addr="$4"; master_port="$5"; node_rank="$6"; log_dir="$7"; join="$8"
      cluster_time_out="$9" ;;
  *) echo "msrun_launcher.sh: expected 1, 2, 6 or 10 arguments, got $#" >&2; usage ;;
esac

for number in "$worker_num" "$local_worker" "$master_port" "$node_rank"; do
  [[ "$number" =~ ^[0-9]+$ ]] || { echo "msrun_launcher.sh: '$number' is not a number" >&2; usage; }
done

# Split CMD the way the shell would, keeping quoted arguments whole (Python's shlex only tokenises: no
# variable expansion or command substitution is run). An unbalanced quote is an error, not a truncated command.
split_command='import shlex, sys
try:
    words = shlex.split(sys.argv[1])
except ValueError as error:
    sys.exit(f"msrun_launcher.sh: cannot split CMD: {error}")
sys.stdout.write("".join(word + "\0" for word in words))'
arguments_file="$(mktemp)"
trap 'rm -f "$arguments_file"' EXIT
python -c "$split_command" "$command_line" > "$arguments_file" || usage
mapfile -d '' arguments < "$arguments_file"
[ "${#arguments[@]}" -ge 1 ] || { echo "msrun_launcher.sh: empty command" >&2; usage; }

mkdir -p "$log_dir"
rm -f "$log_dir"/worker_*.status

interrupted=0
trap 'interrupted=1' INT
echo "msrun_launcher.sh: $worker_num worker(s) ($local_worker on this node), logs in $log_dir" >&2
status=0
# Each worker runs CMD through msrun_worker.py, which records a failing worker's status in LOG_DIR/worker_K.status.
# msrun's own report of a failure (its log lines and a Python traceback) goes to LOG_DIR/msrun.err.
msrun --worker_num="$worker_num" --local_worker_num="$local_worker" --master_addr="$master_addr" \
      --master_port="$master_port" --node_rank="$node_rank" --log_dir="$log_dir" --join="$join" \
      --cluster_time_out="$cluster_time_out" "$repo_root/scripts/msrun_worker.py" "$log_dir" "${arguments[@]}" \
      2> "$log_dir/msrun.err" || status=$?
if [ "$interrupted" -eq 1 ]; then
  echo "msrun_launcher.sh: interrupted; workers stopped, logs in $log_dir" >&2
  exit 130
fi
if [ "$status" -ne 0 ]; then
  mapfile -t records < <(printf '%s\n' "$log_dir"/worker_*.status | sort -V)  # the lowest rank first
  if [ -e "${records[0]}" ]; then
    worker="$(basename "${records[0]}" .status)"
    status="$(tr -d '[:space:]' < "${records[0]}")"
    echo "msrun_launcher.sh: ${worker/_/ } failed with exit status $status; see $log_dir/$worker.log" >&2
    exit "$status"
  fi
  echo "msrun_launcher.sh: msrun failed (exit $status) before any worker did; see $log_dir/msrun.err" >&2
fi
exit "$status"
