#!/usr/bin/env bash
# example_job.sh — a job for distributed-job-scheduler: count the words of one file on a worker.
#
# Usage:  example_job.sh INPUT_FILE
#         (queued with:  ./cli.ts add_job ./example_job.sh data/book.txt)
#
# The scheduler runs it in the directory the job was submitted from, with JOB_ID and SLAVE_IP
# set. It moves the data and runs the work on the worker itself, over ssh and rsync:
#   1. makes a fresh job directory on the worker ($DJS_REMOTE_DIR, default .djs-work/$DJS_RUN_NAME
#      under the remote home: a name no other job, run or server shares, so two campaigns
#      on one worker never touch each other's directories);
#   2. copies INPUT_FILE there;
#   3. runs WORK (below) there: by default `wc -w`, writing the count to <name>.out;
#   4. copies the result back to finished_work/<JOB_ID>_<name>.out (where <name> is INPUT_FILE's
#      file name), creating finished_work/ in the current directory;
#   5. removes the job directory on the worker — also when the work fails or the job is stopped.
# File names may hold spaces, quotes or other odd characters, here and on the worker.
#
# A worker named `local` or `localN` (local1, local2, ...) is this machine: the same steps run
# here without ssh (cp instead of rsync), in $DJS_LOCAL_HOME (default $TMPDIR/djs-local-$UID),
# so you can try the scheduler before setting up ssh keys:
#   ./cli.ts add_slave --skip_ssh_auth_check local1:2 local2:2
#
# A worker named `slurm:PARTITION[@LOGIN_HOST]` is a Slurm partition: the steps run on
# LOGIN_HOST (or here, in $DJS_SLURM_HOME), and the work runs on a compute node through srun
# (see "Slurm workers" below).
#
# Environment:
#   JOB_ID, SLAVE_IP     set by the scheduler: the job's id, the worker (host, address, user@host)
#   DJS_RUN_NAME         set by the scheduler: this run's name (letters, digits, . _ -), which no
#                        other server, job or run shares; run by hand without it, the job
#                        directory is job-$JOB_ID-<this machine>-<this script's pid>
#   SLAVE_GPUS           set by the scheduler: the GPU indices the job holds on the worker (a
#                        job added with --gpus G); the work gets them as CUDA_VISIBLE_DEVICES
#   SLAVE_SLOTS, JOB_TIMEOUT  set by the scheduler: the job's slots (comma list), its --timeout
#                        in seconds (0: none); a Slurm worker's srun asks for as many CPUs and that time
#   DJS_SLURM_HOME       a Slurm worker without a login host: where job directories go (default
#                        $HOME; must be shared with the compute nodes)
#   DJS_SSH_SHARED_CONFIG  set by the scheduler: the ssh config file of its shared connection
#                        to the worker (ssh -F); every ssh and rsync here uses it
#   DJS_SSH_CONFIG       ssh config file used by every ssh and rsync (ssh -F) when the
#                        scheduler shares no connection (DJS_SSH_SHARED=0, or run by hand)
#   DJS_SSH_OPTIONS      more ssh words for every ssh and rsync, split at blanks (-o ProxyJump=gw);
#                        the scheduler sets both to what it checks workers with
#   DJS_REMOTE_DIR       the job directory on the worker (relative to the remote home, or absolute)
#   DJS_SSH_TIMEOUT=T    seconds to wait for the worker's sshd to answer (default 10); a worker
#                        that goes silent mid-job is given up after about 2T (ssh ServerAlive)
#   Test hooks, applied on the worker before the work:
#   DJS_EXAMPLE_SLEEP=S  sleep S seconds first (a long-running job)
#   DJS_EXAMPLE_FAIL=N   exit with code N instead of working (a failing job)
#
# Exit codes:
#   0     done: the result is in finished_work/
#   255   the worker could not be reached, or stopped answering: the worker failed, not the job;
#         on a Slurm worker also: Slurm ended the work or could not start it
#         (the scheduler requeues the job and checks the worker); but not when Slurm
#         refuses the job's own request (GPUs, CPUs, memory or time it cannot have): exit 1
#   2     usage: wrong arguments or environment
#   130, 143  stopped by SIGINT, SIGTERM (the work on the worker is stopped and its directory removed)
#   other the job failed: the work's own exit code (254 if the work itself exits 255), or
#         rsync's when a copy fails on a reachable worker (1 when INPUT_FILE is unreadable)
#
# Adapting it to your own work: change WORK (it runs under sh on the worker, in the job
# directory, with the input file's name as $1 and the result file's name as $2); if your work
# needs more files, copy them in step 2 and fetch more results in step 4. Nothing else needs
# to change. The worker needs a POSIX login shell (sh, bash, dash, zsh), rsync and the tools
# WORK uses.
#
# Stopping: SIGTERM or SIGINT stop the work on the worker too: the remote command records its
# process group (sshd starts every command as a session leader) in .pgid in the job directory,
# and the trap signals that group over a second ssh connection. SIGKILL cannot be trapped: the
# work then runs to its end on the worker and leaves its directory behind.

set -euo pipefail

# The work: runs under sh on the worker, in the job directory. $1 = input file, $2 = result file.
# shellcheck disable=SC2016 # expanded on the worker, not here
WORK='words=$(wc -w < "$1") || exit
printf "%s\n" $words > "$2"'

# ---------------------------------------------------------------- arguments and environment

die_usage() {
	printf 'example_job.sh: %s\nusage: JOB_ID=N SLAVE_IP=HOST example_job.sh INPUT_FILE\n' "$1" >&2
	exit 2
}
[[ $# -eq 1 ]] || die_usage 'expected one INPUT_FILE'
[[ ${JOB_ID:-} =~ ^[0-9]+$ ]] || die_usage 'JOB_ID must be set to an integer'
[[ -n ${SLAVE_IP:-} && ${SLAVE_IP} != -* ]] || die_usage 'SLAVE_IP must name the worker'
[[ ${DJS_SSH_TIMEOUT:=10} =~ ^[1-9][0-9]*$ ]] || die_usage 'DJS_SSH_TIMEOUT must be whole seconds'
[[ ${DJS_EXAMPLE_SLEEP:-0} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die_usage 'DJS_EXAMPLE_SLEEP must be seconds'
[[ ${DJS_EXAMPLE_FAIL:-1} =~ ^[1-9][0-9]*$ ]] || die_usage 'DJS_EXAMPLE_FAIL must be a non-zero exit code'
[[ ${DJS_RUN_NAME:-x} =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || die_usage 'DJS_RUN_NAME must be letters, digits and _ . - (not starting with . or -)'

input=$1
if [[ ! -f $input || ! -r $input ]]; then
	printf "example_job.sh: cannot read input file '%s'\n" "$input" >&2
	exit 1
fi
name=${input##*/}
case $input in
/*) source_path=$input ;;
*) source_path=./$input ;; # rsync would take a colon before the first slash for host:path
esac
host=$SLAVE_IP
# Named by the run, never by JOB_ID alone: job ids start at 1 in every data dir.
run_name=${DJS_RUN_NAME:-job-$JOB_ID-$(uname -n)-$$}
remote_dir=${DJS_REMOTE_DIR:-.djs-work/$run_name}
result=$name.out
local_result=finished_work/${JOB_ID}_$name.out

# ---------------------------------------------------------------- ssh, rsync and quoting

# shq WORD: WORD single-quoted for the worker's shell (any POSIX shell).
shq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
# rsq WORD: WORD quoted for rsync's -e parser (it splits at spaces; '' inside '…' is one ').
rsq() { printf "'%s'" "${1//\'/\'\'}"; }

# BatchMode: never prompt. ServerAlive: a worker silent for about 2 x DJS_SSH_TIMEOUT fails
# ssh with 255 (4 unanswered keepalives, one every T/2 seconds).
ssh_options=(-o BatchMode=yes -o "ConnectTimeout=$DJS_SSH_TIMEOUT"
	-o "ServerAliveInterval=$(((DJS_SSH_TIMEOUT + 1) / 2))" -o ServerAliveCountMax=4)
# The scheduler's shared connection to the worker (one login for all of its jobs' ssh and
# rsync; that config file includes DJS_SSH_CONFIG or ~/.ssh/config), else DJS_SSH_CONFIG.
if [[ -n ${DJS_SSH_SHARED_CONFIG:-} ]]; then
	ssh_options=(-F "$DJS_SSH_SHARED_CONFIG" "${ssh_options[@]}")
elif [[ -n ${DJS_SSH_CONFIG:-} ]]; then
	ssh_options=(-F "$DJS_SSH_CONFIG" "${ssh_options[@]}")
fi
if [[ -n ${DJS_SSH_OPTIONS:-} ]]; then
	read -r -a extra_options <<<"$DJS_SSH_OPTIONS" # split at blanks, as the scheduler does
	ssh_options+=("${extra_options[@]}")
fi
rsync_rsh=ssh
for option in "${ssh_options[@]}"; do rsync_rsh+=" $(rsq "$option")"; done

child=''
# in_background CMD...: runs CMD as a child and waits, so a signal's trap runs at once.
in_background() {
	local rc=0
	"$@" </dev/null &
	child=$!
	wait "$child" || rc=$?
	child=''
	return "$rc"
}

# A `local`/`localN` worker is this machine: its "home" is a local directory, its commands
# run under sh in a new session (as sshd would start them), and copies are plain cp.
local_home=''
if [[ $host =~ ^local[0-9]*$ ]]; then
	local_home=${DJS_LOCAL_HOME:-${TMPDIR:-/tmp}/djs-local-$(id -u)}
	mkdir -p -- "$local_home"
fi

# ---------------------------------------------------------------- Slurm workers
# A worker named slurm:PARTITION[@LOGIN_HOST] is a Slurm partition. Every step runs on
# LOGIN_HOST over ssh as above (or, with no login host, here, in $DJS_SLURM_HOME, default
# $HOME), and step 3 runs the work on a compute node with srun: Slurm job name djs-$JOB_ID,
# one task of as many CPUs as the job has slots (SLAVE_SLOTS), its GPUs (SLAVE_GPUS; Slurm
# sets CUDA_VISIBLE_DEVICES), and its --timeout (JOB_TIMEOUT) as the time limit, rounded up
# to minutes. The work's output goes to srun's, so into the job's log. The job directory
# must be on a file system the compute nodes share (a cluster's home directory is): the
# work writes its exit code to .rc there, and an srun that ends without one means Slurm
# ended the work (node failure, preemption, cancelled from outside) or never started it
# (no allocation): exit 255, and djs runs the job again; but when srun says Slurm refuses
# the job's own request (SLURM_REFUSALS: GPUs the partition lacks, too many CPUs, a time
# limit over the partition's), the job fails with exit 1. Stopping the job (SIGTERM) cancels
# its Slurm job (scancel) and waits until Slurm no longer lists it; when Slurm's controller
# does not answer, a canceller left in the background cancels it once it does.
slurm_partition=''
if [[ $host =~ ^slurm:([A-Za-z0-9_][A-Za-z0-9_.-]*)(@(.+))?$ ]]; then
	slurm_partition=${BASH_REMATCH[1]}
	if [[ -n ${BASH_REMATCH[3]} ]]; then
		host=${BASH_REMATCH[3]}
	else
		local_home=${DJS_SLURM_HOME:-$HOME}
	fi
fi

# What srun says when Slurm refuses the job's own request (its GPUs, CPUs, memory, time):
# the job fails (exit 1), as running it again, anywhere in this partition, cannot help.
SLURM_REFUSALS=('Invalid generic resource' 'Invalid Trackable RESource' 'Requested node configuration is not available'
	'Requested time limit is invalid' 'More processors requested than permitted' 'Memory required by task is not available'
	'Node count specification invalid' 'Job violates accounting/QOS policy')

# count LIST: the number of words in a comma list.
count() { local IFS=,; local -a a; read -r -a a <<<"$1"; printf '%s' "${#a[@]}"; }

# slurm_run WORK: the shell command that runs WORK under srun and exits with its code, or
# with 255 when Slurm, not the work, ended it.
slurm_run() {
	local srun="srun --job-name=djs-$JOB_ID --partition=$slurm_partition --ntasks=1"
	srun+=" --cpus-per-task=$(count "${SLAVE_SLOTS:-0}")"
	if [[ -n ${SLAVE_GPUS:-} ]]; then srun+=" --gpus=$(count "$SLAVE_GPUS")"; fi
	if ((${JOB_TIMEOUT:-0} > 0)); then srun+=" --time=$(((JOB_TIMEOUT + 59) / 60))"; fi
	# srun's own messages go to the log and to .srun (the work's stderr joins its stdout), so
	# that a request Slurm refuses is told from Slurm ending the work.
	local refused='' reason
	for reason in "${SLURM_REFUSALS[@]}"; do refused+=" -e $(shq "$reason")"; done
	printf '%s' "rm -f .rc .srun .slurm_job; { $srun sh -c $(shq "exec 2>&1
echo \"\$SLURM_JOB_ID\" > .slurm_job
$1
echo \$? > .rc") 2>&1 1>&3 | tee .srun >&2; } 3>&1
if [ ! -f .rc ]; then rm -f .pgid
  if grep -q -F$refused .srun; then echo 'example_job.sh: Slurm refused what this job asks for (above): the job fails' >&2; exit 1; fi
  exit 255
fi
(exit \"\$(cat .rc)\")"
}

# slurm_cancel: the shell command that cancels this job's Slurm job and waits (up to 10 s)
# until Slurm no longer lists it. The cancel is left to a canceller in the background
# (nohup), which asks again every second until Slurm answers and no longer lists the job
# (for up to a day): a controller that does not answer now (slurmctld down or restarting)
# gets the cancel once it is back, though this script has ended by then. It cancels the
# Slurm job by its id (the work wrote it to .slurm_job, or srun said it queued it), so a
# later run of the same djs job is not touched; by name only when no id is known.
slurm_cancel() {
	local which="-u \"\$(id -un)\" -p $slurm_partition -n djs-$JOB_ID"
	local canceller="n=0
while [ \$n -lt 86400 ]; do
	if [ -n \"\$1\" ]; then scancel \"\$1\"; else scancel $which; fi
	if ids=\$(squeue -h $which -o %i); then
		if [ -n \"\$1\" ]; then printf '%s\n' \"\$ids\" | grep -qx \"\$1\" || exit 0; elif [ -z \"\$ids\" ]; then exit 0; fi
	fi
	sleep 1; n=\$((n + 1))
done"
	printf '%s' "j=\$(cat $(shq "$remote_dir/.slurm_job") 2>/dev/null)
[ -n \"\$j\" ] || j=\$(sed -n 's/^srun: job \\([0-9][0-9]*\\) queued.*/\\1/p' $(shq "$remote_dir/.srun") 2>/dev/null | head -n 1)
nohup sh -c $(shq "$canceller") sh \"\$j\" </dev/null >/dev/null 2>&1 &
n=0
while [ \$n -lt 100 ] && [ -n \"\$(squeue -h $which -o %i 2>/dev/null)\" ]; do sleep 0.1; n=\$((n + 1)); done; "
}

# on_worker COMMAND: runs the shell COMMAND on the worker; 255 means it was not reached.
on_worker() {
	if [[ -n $local_home ]]; then
		in_background setsid -w sh -c "cd -- $(shq "$local_home") || exit 255; $1"
	else
		in_background ssh "${ssh_options[@]}" -- "$host" "$1"
	fi
}

# local_path HOST:PATH: where PATH of the local worker is here.
local_path() {
	local p=${1#"$host:"}
	if [[ $p == /* ]]; then printf '%s' "$p"; else printf '%s/%s' "$local_home" "$p"; fi
}

# copy FROM TO: rsync one file; exits 255 when the worker cannot be reached, or with rsync's
# code when it is reachable (rsync missing there, a file missing, …).
copy() {
	local rc=0
	if [[ -n $local_home ]]; then
		local from=$1 to=$2
		[[ $from == "$host:"* ]] && from=$(local_path "$from")
		[[ $to == "$host:"* ]] && to=$(local_path "$to")
		in_background cp -p -- "$from" "$to" || finish "$?"
		return 0
	fi
	in_background rsync --protect-args --times -e "$rsync_rsh" -- "$1" "$2" || rc=$?
	case $rc in
	0) return 0 ;;
	255) finish 255 ;; # ssh's own failure, passed on by rsync
	10 | 12 | 30 | 35) # socket, stream or timeout errors: the connection, or rsync on the worker?
		on_worker true || finish 255
		;;
	esac
	printf 'example_job.sh: rsync failed (%s) copying %s to %s\n' "$rc" "$1" "$2" >&2
	finish "$rc"
}

# finish CODE: removes the job directory on the worker (unless it is unreachable), exits CODE.
finish() {
	trap - TERM INT
	# (Exit 255 from a Slurm worker run here is Slurm's failure: this machine is reachable.)
	if ((made_remote_dir)) && { (($1 != 255)) || [[ -n $slurm_partition && -n $local_home ]]; }; then
		on_worker "rm -rf -- $(shq "$remote_dir")" ||
			printf "example_job.sh: could not remove '%s' on %s\n" "$remote_dir" "$host" >&2
	fi
	exit "$1"
}

# shellcheck disable=SC2317 # called by the traps below
# stop_job CODE: on SIGTERM/SIGINT, stops the work's process group on the worker, then finish.
stop_job() {
	trap - TERM INT
	if [[ -n $child ]]; then kill "$child" 2>/dev/null || true; fi
	local pgid_file
	pgid_file=$(shq "$remote_dir/.pgid")
	# TERM the group; give it 3 s to end, then KILL whatever is left.
	on_worker "$([[ -n $slurm_partition ]] && slurm_cancel)if p=\$(cat $pgid_file 2>/dev/null) && [ -n \"\$p\" ]; then
		kill -TERM -\$p 2>/dev/null; n=0
		while [ \$n -lt 30 ] && kill -0 -\$p 2>/dev/null; do sleep 0.1; n=\$((n + 1)); done
		kill -KILL -\$p 2>/dev/null
	fi; rm -rf -- $(shq "$remote_dir")" || true
	made_remote_dir=0
	finish "$1"
}

made_remote_dir=0
trap 'stop_job 143' TERM
trap 'stop_job 130' INT

# ---------------------------------------------------------------- the job, step by step

# 1. A fresh job directory on the worker (a retried job may find its old one).
made_remote_dir=1 # from here on, stopping the job must clean up on the worker
on_worker "rm -rf -- $(shq "$remote_dir") && mkdir -p -- $(shq "$remote_dir")" || finish "$?"

# 2. The input.
copy "$source_path" "$host:$remote_dir/"

# 3. The work, in the job directory. Its shell leads its own process group (sshd starts it
# in a new session), so .pgid is what stop_job signals. The work never exits 255: that code
# means "worker unreachable".
work="sh -c $(shq "$WORK") sh $(shq "$name") $(shq "$result")"
if [[ -n ${DJS_EXAMPLE_FAIL:-} ]]; then work="(exit $DJS_EXAMPLE_FAIL)"; fi
if [[ -n ${DJS_EXAMPLE_SLEEP:-} ]]; then work="sleep $DJS_EXAMPLE_SLEEP; $work"; fi
# The GPUs this job holds, for CUDA programs (the same names of devices on every job's worker).
if [[ -n ${SLAVE_GPUS:-} && -z $slurm_partition ]]; then work="CUDA_VISIBLE_DEVICES=$(shq "$SLAVE_GPUS"); export CUDA_VISIBLE_DEVICES; $work"; fi
if [[ -n $slurm_partition ]]; then work=$(slurm_run "$work"); fi
on_worker "cd -- $(shq "$remote_dir") || exit 1
echo \$\$ > .pgid || exit 1
$work
rc=\$?
rm -f .pgid
if [ \$rc -eq 255 ]; then rc=254; fi
exit \$rc" || finish "$?"

# 4. The result.
mkdir -p finished_work
copy "$host:$remote_dir/$result" "$local_result"

# 5. Clean up on the worker.
finish 0
