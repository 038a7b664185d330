"""Test-only set-up of every Ray worker process (tests/test_ray.py).

vLLM 0.32 refuses Ray on its CPU platform only because
`CpuPlatform.ray_device_key` is empty (vllm/platforms/interface.py; checked
in vllm/v1/executor/ray_utils.py initialize_ray_cluster and, inside each
worker actor, ray_executor_v2.py get_node_and_physical_gpu_ids). The key
must name a Ray accelerator: Ray refuses "CPU" as an actor resource
(ray/_common/ray_option_utils.py) and the worker looks its device up in
`get_accelerator_ids()`, which lists accelerators only. So the tests give Ray
fake GPUs and the CPU platform claims them; the workers still compute on the
CPU.
"""


def place_cpu_workers_on_fake_gpus() -> None:
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.ray_device_key = "GPU"
