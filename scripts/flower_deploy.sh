#!/usr/bin/env bash
# A Flower deployment of fedlora on this machine (loopback): a SuperLink with TLS and SuperNode authentication,
# N SuperNodes (one per partition, keys registered with `flwr supernode register`), one `flwr run`, and then every
# process it started is stopped (by process id), also on Ctrl-C or error.
#
#   bash scripts/flower_deploy.sh --supernodes 2 --run-config "method='fedsa' rounds=2 out='runs/fedsa-deploy'"
#   bash scripts/flower_deploy.sh --supernodes 4 --run-config run.toml --workdir /tmp/fed   # keeps certs, keys, logs
#
# Options: --supernodes N (default 2; the run's `clients` is set to N unless given), --run-config "k=v ..." or FILE.toml
# (keys are `fedlora run`'s long flags), --workdir DIR (default: a temporary folder), --app DIR (default: this repo),
# --gateway ADDRESS (SuperNodes connect through a Fleet-API-only gateway on ADDRESS, an address of this host; the
# SuperLink then listens on 127.0.0.1 only), --no-workers, --no-state-dirs (by default each SuperNode gets a model
# worker and a state directory). Certificates, SuperNode keys, FLWR_HOME, state directories and logs go to the work
# directory; telemetry and runtime dependency installation are off. --run-config may be given again (the later wins).
#
# A killed deployment continues with the same command, the same --workdir and --run-config "resume=true" added.
# Exit status: 0 when the run completed; 2 for a setting refused (before anything starts, or by the ServerApp: e.g. a
# run directory that already holds a run); 1 for any other failure; the reason in one line on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1
exec python -m fedlora.flower.loopback "$@"
