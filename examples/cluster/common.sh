# Shared launcher functions for the cluster templates (sourced, never run).
#
#   let_cluster_env            NCCL / CUDA environment for Megatron-LM on InfiniBand GPU nodes
#   let_srun_torchrun ARGS...  SLURM: one torchrun per node (srun), c10d rendezvous on the first node
#   let_torchrun ARGS...       Kubernetes / any launcher that already started one container per node
#   let_requeue_if_unfinished  SLURM: requeue this job if the checkpoint is short of --train-iters
#
# LET_DRY_RUN=1 prints the command (one argument per line) instead of running it; the tests use it
# and so can you, to check a job before submitting it.

# Where the project (and pretrain_gpt_let.py) lives on the compute nodes.
LET_REPO=${LET_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}

let_cluster_env() {
    # Megatron-LM needs one CUDA hardware queue so that TP/SP communication kernels are scheduled
    # in issue order (it checks this when comm overlap is on).
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # NCCL: fail fast on a dead peer instead of hanging until the job's time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # InfiniBand / RoCE. Set NCCL_IB_HCA (e.g. mlx5) and NCCL_SOCKET_IFNAME (the bootstrap/TCP
    # interface, e.g. ib0 or eth0) for your fabric; the defaults below only exclude loopback/docker.
    export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
    [[ -n "${NCCL_IB_HCA:-}" ]] && export NCCL_IB_HCA
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    # dataloader workers x 8 ranks per node: keep intra-op threads modest.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
    # Megatron-LM itself: pretrain_gpt_let.py runs Megatron-LM's pretrain() when it can import
    # megatron.training (this checkout) and the lean megatron-core trainer otherwise.
    if [[ -n "${MEGATRON_LM_PATH:-}" ]]; then
        export MEGATRON_LM_PATH
        export PYTHONPATH="${LET_REPO}:${MEGATRON_LM_PATH}${PYTHONPATH:+:${PYTHONPATH}}"
    else
        export PYTHONPATH="${LET_REPO}${PYTHONPATH:+:${PYTHONPATH}}"
    fi
}

_let_run() {
    if [[ "${LET_DRY_RUN:-0}" == 1 ]]; then
        printf '%s\n' "$@"
        return 0
    fi
    "$@"
}

# torchrun arguments for NNODES x GPUS_PER_NODE processes meeting at MASTER_ADDR:MASTER_PORT.
_let_torchrun_cmd() {
    LET_TORCHRUN=(torchrun
        --nnodes "${NNODES}" --nproc-per-node "${GPUS_PER_NODE}"
        --rdzv-id "${RDZV_ID}" --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}"
        --max-restarts 0
        "${LET_REPO}/pretrain_gpt_let.py")
}

let_srun_torchrun() {
    NNODES=${SLURM_NNODES:?run inside an sbatch allocation (or set SLURM_NNODES)}
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
    # The first node of the allocation hosts the c10d rendezvous store.
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)}
    MASTER_PORT=${MASTER_PORT:-29500}
    RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID}}
    _let_torchrun_cmd
    # One task per node; each torchrun starts GPUS_PER_NODE ranks. --kill-on-bad-exit stops the
    # other nodes when one fails; SIGTERM (scancel, preemption) reaches torchrun, which forwards
    # it to the ranks: Megatron-LM's --exit-signal-handler then saves a checkpoint and exits.
    _let_run srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpu-bind=none \
        "${LET_TORCHRUN[@]}" "$@"
}

let_torchrun() {
    # Kubeflow's PyTorchJob sets MASTER_ADDR / MASTER_PORT (the master pod's service) and
    # PET_NNODES; one container per node runs this.
    NNODES=${NNODES:-${PET_NNODES:?set NNODES (or PET_NNODES)}}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${PET_NPROC_PER_NODE:-8}}
    MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR}
    MASTER_PORT=${MASTER_PORT:-29500}
    RDZV_ID=${RDZV_ID:-${JOB_NAME:-let}}
    _let_torchrun_cmd
    _let_run "${LET_TORCHRUN[@]}" "$@"
}

# After the training step: if Megatron-LM stopped early (--exit-duration-in-mins, or a SIGTERM with
# --exit-signal-handler) it saved a checkpoint; requeue the job so the next allocation resumes from
# --load (the same directory as --save). Gives up after LET_MAX_REQUEUES or on a failed run.
let_requeue_if_unfinished() {
    local rc=$1 ckpt_dir=$2 train_iters=$3 done_iters=0
    [[ "${LET_DRY_RUN:-0}" == 1 ]] && return 0
    if [[ -f "${ckpt_dir}/latest_checkpointed_iteration.txt" ]]; then
        done_iters=$(cat "${ckpt_dir}/latest_checkpointed_iteration.txt")
    fi
    echo "training step exited with ${rc}; checkpointed iteration ${done_iters} of ${train_iters}"
    if [[ "${rc}" != 0 ]]; then
        echo "not requeueing a failed run (see the log above)"
        return "${rc}"
    fi
    if [[ "${done_iters}" =~ ^[0-9]+$ ]] && (( done_iters < train_iters )) \
            && (( ${SLURM_RESTART_COUNT:-0} < ${LET_MAX_REQUEUES:-20} )); then
        echo "requeueing job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0})"
        scontrol requeue "${SLURM_JOB_ID}"
    fi
}
