"""Adam and RMSProp updates without ``torch.optim``.

``torch.optim``'s optimizers import ``torch._dynamo`` (~800 modules) on construction and on every first
call of ``step``/``zero_grad``/``state_dict``: 0.7 s on a quiet Zen 4-class core, 3-8 s on 2 cores while the
other roles import torch, on the learner's path to its first training step. These classes make the same
updates (same operation order as torch's ``foreach`` implementations, so the same floats; tests compare
them step by step) with ``torch._foreach_*`` kernels, and keep ``torch.optim``'s state-dict layout, so a
checkpoint written with ``torch.optim`` (earlier versions of this project) still loads.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class _Optimizer:
    """Parameters, their per-parameter state tensors (``slots``) and the step count."""

    slots: tuple[str, ...] = ()

    def __init__(self, params: Iterable[torch.Tensor], hyper: dict) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("an optimizer needs at least one parameter")
        self.hyper = hyper  # torch.optim's param_group keys and values: also the state dict's
        self.steps = 0
        self.state = {s: [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
                      for s in self.slots}

    @property
    def lr(self) -> float:
        return self.hyper["lr"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def _with_grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """(params, grads, state slots) of the parameters that have a gradient this step."""
        keep = [i for i, p in enumerate(self.params) if p.grad is not None]
        return ([self.params[i] for i in keep], [self.params[i].grad for i in keep],
                {s: [v[i] for i in keep] for s, v in self.state.items()})

    @torch.no_grad()
    def step(self) -> None:
        params, grads, state = self._with_grads()
        self.steps += 1
        if params:
            self._update(params, grads, state)

    def _update(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                state: dict[str, list[torch.Tensor]]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """``torch.optim``'s format: {"state": {index: {"step", slots...}}, "param_groups": [...]}."""
        state = {i: {"step": torch.tensor(float(self.steps)), **{s: self.state[s][i] for s in self.slots}}
                 for i in range(len(self.params))}
        return {"state": state, "param_groups": [{**self.hyper, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, sd: dict) -> None:
        """Load our state dict or a ``torch.optim`` one of the same optimizer over the same parameters
        (a parameter that had no step yet has no state there: its slots stay zero)."""
        groups = sd["param_groups"]
        n = sum(len(g["params"]) for g in groups)
        if n != len(self.params):
            raise ValueError(f"optimizer state for {n} parameters, this network has {len(self.params)}")
        order = [i for g in groups for i in g["params"]]
        steps = 0
        for k, i in enumerate(order):
            st = sd["state"].get(i)
            if not st:
                continue
            missing = [s for s in self.slots if s not in st]
            if missing:
                raise ValueError(f"optimizer state without {missing}: not a {type(self).__name__} state")
            for s in self.slots:
                self.state[s][k].copy_(st[s])
            steps = max(steps, int(float(st["step"])))
        self.steps = steps


class Adam(_Optimizer):
    """Adam (Kingma & Ba 2015, bias-corrected): ``torch.optim.Adam`` without weight decay or amsgrad."""

    slots = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=0, amsgrad=False))

    def _update(self, params, grads, state) -> None:
        beta1, beta2 = self.hyper["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, (1 - beta2 ** self.steps) ** 0.5)
        torch._foreach_add_(denom, self.hyper["eps"])
        torch._foreach_addcdiv_(params, m, denom, (self.lr / (1 - beta1 ** self.steps)) * -1)


class RMSprop(_Optimizer):
    """RMSProp (Tieleman & Hinton; ``centered``: Graves 2013's, as the Ape-X paper's learner uses):
    ``torch.optim.RMSprop`` without momentum or weight decay."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, alpha: float = 0.99, eps: float = 1e-8,
                 centered: bool = False) -> None:
        self.slots = ("square_avg", "grad_avg") if centered else ("square_avg",)
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, centered=centered, momentum=0, weight_decay=0))

    def _update(self, params, grads, state) -> None:
        alpha = self.hyper["alpha"]
        sq = state["square_avg"]
        torch._foreach_mul_(sq, alpha)
        torch._foreach_addcmul_(sq, grads, grads, 1 - alpha)
        if self.hyper["centered"]:
            g = state["grad_avg"]
            torch._foreach_lerp_(g, grads, 1 - alpha)
            avg = torch._foreach_addcmul(sq, g, g, -1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(sq)
        torch._foreach_add_(avg, self.hyper["eps"])
        torch._foreach_addcdiv_(params, grads, avg, -self.lr)
