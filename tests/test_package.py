import json
import subprocess
import sys

from echomoe.cli import main


def test_import_is_light():
    code = (
        "import sys, echomoe, echomoe.moe, echomoe.data, echomoe.models, echomoe.metrics; "
        "heavy = [m for m in ('wandb', 'deepspeed', 'matplotlib', 'datasets') "
        "if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_cli_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "region_hard" in info["routers"] and "grouped_mm" in info["backends"]
