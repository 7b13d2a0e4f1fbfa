"""scripts/setup_env.sh picks jax's build for the machine: the CUDA plugin of the pinned jax where nvidia-smi reports
a GPU (CUDA 13 from driver 580, else CUDA 12), the CPU build elsewhere, FAIRDIFF_ACCELERATOR overriding. Checked
with `--which-jax` (prints the requirement, installs nothing) and a stand-in nvidia-smi."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINNED = re.search(r"^jax==([\d.]+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)


def which_jax(tmp_path, driver: str | None, accelerator: str | None = None) -> subprocess.CompletedProcess:
    """Runs `setup_env.sh --which-jax` with PATH holding only a stand-in nvidia-smi (printing `driver`, or failing
    as it does without a GPU when driver is None) and the shell tools the script uses."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {driver}\n" if driver else "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    smi.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
    env.pop("FAIRDIFF_ACCELERATOR", None)
    if accelerator is not None:
        env["FAIRDIFF_ACCELERATOR"] = accelerator
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup_env.sh"), "--which-jax"], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(
    "driver, accelerator, expected",
    [
        ("580.65.06", None, "jax[cuda13]=={v}"),
        ("535.104.05", None, "jax[cuda12]=={v}"),
        (None, None, "jax=={v}"),
        ("580.65.06", "cpu", "jax=={v}"),
        (None, "cuda", "jax[cuda13]=={v}"),
        ("580.65.06", "cuda12", "jax[cuda12]=={v}"),
    ],
)
def test_setup_picks_the_jax_build_of_the_machine(tmp_path, driver, accelerator, expected):
    result = which_jax(tmp_path, driver, accelerator)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(" ")[0] == expected.format(v=PINNED), result.stdout
    if driver and accelerator is None:
        assert f"NVIDIA driver {driver}" in result.stdout  # says why


def test_setup_rejects_an_unknown_accelerator_by_name(tmp_path):
    result = which_jax(tmp_path, None, "gpu")
    assert result.returncode == 2 and "FAIRDIFF_ACCELERATOR=gpu" in result.stderr
