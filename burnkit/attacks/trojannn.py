"""TrojanNN (Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018), all-to-one by default.

1. Take a clean model of the victim's architecture (``python -m burnkit.resources clean_model``).
2. Pick the ``num_neuron`` inputs of ``selected_layer_name`` (default: the zoo's last layer) with the
   largest summed absolute weight in ``selected_layer_param_name``, among those that are non-zero on
   the mask image (a dead ReLU has zero gradient and cannot be excited; BackdoorBench does not skip
   them, and its search then returns the unchanged mask image).
3. Optimise the trigger: start from the mask image ([0, 1]), take ``mask_update_iters`` signed
   gradient steps of ``trigger_step_size`` that push those activations towards
   ``neuron_target_values`` (mean squared error), keeping the change within ``trigger_eps`` (L-inf),
   the image in [0, 1] and everything outside the mask at 0 (spec §6.2).
4. Poison by **adding** the trigger (0..255) to the image and clipping, then train the victim from
   scratch as BackdoorBench does. BackdoorBench casts the sum to uint8 before clipping, so bright
   pixels wrap around modulo 256 (spec §9.5); we add in a wider type and clip to [0, 255] instead.

The default mask is our own: a filled rectangle over BackdoorBench's ``apple4.png`` region (rows
120-203, cols 128-194 of 224, scaled to the image); ``--mask_path`` takes any image (non-zero pixels
form the mask). The trigger is saved as ``trojannn_trigger.png`` in the record.

Example:
    python -m burnkit.resources clean_model --dataset cifar10 --model preactresnet18
    python attack/trojannn.py --dataset cifar10 --model preactresnet18 --save_folder_name trojannn_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import attack_models

from ..attack import Attack, AttackConfig, register_attack
from ..config import option
from ..engine import eval_mode, resolve_device
from ..errors import BurnError
from ..resources import DEFAULT_CACHE, load_clean_model
from .triggers import load_trigger_image

APPLE_REGION = ((120, 204), (128, 195), 224)  # rows, cols (end-exclusive) of BackdoorBench's mask, on 224 px


@dataclass
class TrojanNNConfig(AttackConfig):
    selected_layer_name: str | None = option(None, "layer whose inputs are the chosen neurons",
                                             default_help="the zoo's last layer")
    selected_layer_param_name: str | None = option(None, "weight ranking the neurons",
                                                   default_help="<layer>.weight")
    num_neuron: int = option(2, "neurons to excite")
    neuron_target_values: float = option(100.0, "activation the trigger pushes them to")
    mask_path: str | None = option(None, "mask image, non-zero = trigger area",
                                   default_help="an apple4-like rectangle")
    mask_update_iters: int = option(1000, "signed-gradient steps")
    trigger_step_size: float = option(0.1, "step in [0, 1] pixel units")
    trigger_eps: float = option(0.3, "L-inf bound of the change from the mask image")
    clean_model_path: str | None = option(None, "clean model state dict",
                                          default_help="the cache's clean_model.pth")
    resource_cache: str = option(DEFAULT_CACHE, "folder of generated attack resources")

    def validate(self) -> None:
        super().validate()
        if self.num_neuron <= 0 or self.mask_update_iters < 0 or self.trigger_step_size <= 0 or self.trigger_eps < 0:
            raise BurnError("need num_neuron > 0, mask_update_iters >= 0, trigger_step_size > 0, trigger_eps >= 0")


def default_mask_image(h: int, w: int, c: int) -> np.ndarray:
    """White rectangle on black over the apple4 region, ``h x w x c`` uint8."""
    (r0, r1), (c0, c1), size = APPLE_REGION
    img = np.zeros((h, w, c), dtype=np.uint8)
    img[int(r0 * h / size):int(np.ceil(r1 * h / size)), int(c0 * w / size):int(np.ceil(c1 * w / size))] = 255
    return img


def select_neurons(net: torch.nn.Module, param_name: str, count: int,
                   active: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``count`` layer inputs with the largest summed |weight| (dim 1 = inputs).

    With ``active`` (bool per input), inputs that are 0 on the start image are skipped when enough
    others are active: behind a ReLU their gradient is exactly 0, so no trigger step could excite them.
    """
    params = dict(net.named_parameters())
    if param_name not in params:
        raise BurnError(f"selected_layer_param_name {param_name!r} is not a parameter of the model; "
                        f"e.g. {next(iter(params))!r}")
    weight = params[param_name].detach()
    if weight.ndim < 2:
        raise BurnError(f"{param_name} has shape {tuple(weight.shape)}; pick a Linear or Conv weight")
    importance = weight.abs().transpose(0, 1).reshape(weight.shape[1], -1).sum(1)
    if count > len(importance):
        raise BurnError(f"num_neuron {count} exceeds the {len(importance)} inputs of {param_name}")
    if active is not None and int(active.sum()) >= count:
        importance = torch.where(active.to(importance.device), importance, torch.full_like(importance, -1.0))
    return importance.topk(count).indices


def _input_width(net: torch.nn.Module, param_name: str) -> int:
    params = dict(net.named_parameters())
    if param_name not in params or params[param_name].ndim < 2:
        raise BurnError(f"selected_layer_param_name {param_name!r} is not a Linear/Conv weight of the model")
    return params[param_name].shape[1]


class LayerInput:
    """Captures the input of ``net.<name>`` (per channel mean for conv inputs) during forward."""

    def __init__(self, net: torch.nn.Module, name: str):
        modules = dict(net.named_modules())
        if name not in modules:
            raise BurnError(f"selected_layer_name {name!r} is not a layer of the model; "
                            f"its last layer is {list(modules)[-1]!r}")
        self.value = None
        self.handle = modules[name].register_forward_pre_hook(self._grab)

    def _grab(self, module, inputs):
        x = inputs[0]
        self.value = x.flatten(2).mean(2) if x.ndim > 2 else x

    def close(self):
        self.handle.remove()


def optimise_trigger(model, layer: str, neurons: torch.Tensor, start: torch.Tensor, mask: torch.Tensor, *,
                     target_value: float, iters: int, step: float, eps: float) -> torch.Tensor:
    """TrojanNN's trigger search; ``start``/``mask`` are C x H x W in [0, 1] / {0, 1}, on the model's device."""
    probe = LayerInput(model.net, layer)
    x = start * mask
    try:
        with eval_mode(model):
            for _ in range(iters):
                x.requires_grad_(True)
                model(x[None])
                acts = probe.value[:, neurons]
                loss = F.mse_loss(acts, torch.full_like(acts, target_value))
                grad, = torch.autograd.grad(loss, x)
                with torch.no_grad():
                    x = x - step * grad.sign()
                    x = torch.min(torch.max(x, start - eps), start + eps).clamp(0, 1) * mask
    finally:
        probe.close()
    return x.detach()


@torch.no_grad()
def neuron_activations(model, layer: str, neurons: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
    """Activations of the chosen neurons for a batch ``x01`` (N x C x H x W in [0, 1])."""
    probe = LayerInput(model.net, layer)
    try:
        with eval_mode(model):
            model(x01)
        return probe.value[:, neurons].detach()
    finally:
        probe.close()


def add_trigger(images: np.ndarray, trigger: np.ndarray) -> np.ndarray:
    """``clip(x + trigger, 0, 255)`` computed without uint8 wrap-around."""
    return np.clip(images.astype(np.int16) + trigger.astype(np.int16)[None], 0, 255).astype(np.uint8)


@register_attack
class TrojanNN(Attack):
    """TrojanNN: neuron-exciting additive trigger from a clean model."""

    name = "trojannn"
    config_cls = TrojanNNConfig

    @classmethod
    def attack_yaml_candidates(cls, values):
        return [f"config/attack/trojannn/{values.get('model', 'preactresnet18')}.yaml",
                "config/attack/trojannn/default.yaml"]

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        h, w, c = info.img_size
        self.layer = cfg.selected_layer_name or attack_models.last_layer_name(cfg.model)
        param = cfg.selected_layer_param_name or f"{self.layer}.weight"
        device = resolve_device(cfg.device)
        model = load_clean_model(info, cfg.model, cfg.resource_cache, cfg.clean_model_path, cfg.dataset_path).to(device)
        mask_img = load_trigger_image(cfg.mask_path, (h, w), c) if cfg.mask_path else default_mask_image(h, w, c)
        area = torch.as_tensor(mask_img.max(axis=2) > 0)
        if not area.any():
            raise BurnError(f"mask {cfg.mask_path} has no non-zero pixel; use an image with a visible trigger area")
        start = torch.as_tensor(mask_img, dtype=torch.float32).permute(2, 0, 1).div(255).to(device)
        mask = area[None].expand(c, h, w).float().to(device)
        every = torch.arange(_input_width(model.net, param), device=device)
        active = neuron_activations(model, self.layer, every, (start * mask)[None])[0] > 0
        self.neurons = select_neurons(model.net, param, cfg.num_neuron, active).to(device)
        trigger = optimise_trigger(model, self.layer, self.neurons, start, mask, target_value=cfg.neuron_target_values,
                                   iters=cfg.mask_update_iters, step=cfg.trigger_step_size, eps=cfg.trigger_eps)
        self.activations = (neuron_activations(model, self.layer, self.neurons, (start * mask)[None]).cpu().tolist(),
                            neuron_activations(model, self.layer, self.neurons, trigger[None]).cpu().tolist())
        self.trigger = (trigger * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()

    def apply_trigger(self, images, labels, indices, train):
        return add_trigger(images, self.trigger)

    def provenance(self):
        return {"trigger": "trojannn_trigger.png (added, clipped)", "selected_layer": self.layer,
                "neurons": self.neurons.cpu().tolist(), "activations_mask_then_trigger": self.activations}

    def save_artifacts(self, record_dir: Path) -> None:
        img = self.trigger.squeeze(-1) if self.trigger.shape[-1] == 1 else self.trigger
        Image.fromarray(img).save(Path(record_dir) / "trojannn_trigger.png")
