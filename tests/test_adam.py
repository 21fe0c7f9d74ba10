"""FusedAdam: torch.optim.Adam(fused=True)'s steps without importing torch._dynamo."""

import subprocess
import sys

import torch

from vaeops.training.adam import FusedAdam


def _pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    a = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    b = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    b.load_state_dict(a.state_dict())
    return a, b


def _steps(model: torch.nn.Module, opt, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        for group in opt.param_groups:
            group["lr"] = 1e-2 / (1 + i)  # the loop sets lr per step
        x = torch.randn(16, 7, generator=torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()


def test_matches_torch_fused_adam_step_for_step() -> None:
    ours, theirs = _pair()
    opt_a = FusedAdam(ours.parameters(), lr=1e-2, weight_decay=0.01)
    opt_b = torch.optim.Adam(theirs.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    _steps(ours, opt_a, 30)
    _steps(theirs, opt_b, 30)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_round_trips_and_resumes_exactly() -> None:
    straight, resumed = _pair()
    opt = FusedAdam(straight.parameters(), lr=1e-2)
    _steps(straight, opt, 20)

    first = FusedAdam(resumed.parameters(), lr=1e-2)
    _steps(resumed, first, 10)
    saved = first.state_dict()
    again = FusedAdam(resumed.parameters(), lr=1e-2)
    again.load_state_dict(saved)
    _steps(resumed, again, 10, start=10)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    # The layout is torch.optim's: its Adam takes our state, so a checkpoint resumes either way.
    torch.optim.Adam(resumed.parameters(), lr=1e-2).load_state_dict(saved)


def test_training_does_not_import_dynamo() -> None:
    code = (
        "import sys, torch; from vaeops.training.adam import FusedAdam\n"
        "m = torch.nn.Linear(3, 2); o = FusedAdam(m.parameters(), lr=0.1)\n"
        "m(torch.ones(1, 3)).sum().backward(); o.step(); o.zero_grad()\n"
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
