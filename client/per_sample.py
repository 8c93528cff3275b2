"""Per-sample gradients as pure functions of (weights, images, labels), for client.fused_dp to clip and compile.

Two ways, the same result:
- `layerwise`: one batched forward and backward, like non-private training, that also returns each layer's input
  and the gradient at its output (a zero "probe" is added to every layer's output and differentiated). A layer's
  per-sample weight gradients follow from those two in closed form (a matrix product per sample, the same algebra
  as Opacus's hooks), or stay factored where their norms and sums are cheaper that way (`Factored`). Conv weight
  gradients come from unfold + bmm: under vmap they become grouped convolutions, which made the CNN's DP step 1.4x
  its plain step on this CPU; here a chunk costs what a plain step does.
  Needs a model torch.fx can trace whose every weight lives in a Linear, Conv2d (groups 1, zero padding) or
  GroupNorm used once per forward; samples must not interact (no BatchNorm), which Opacus's validator ensures.
- `by_vmap`: vmap(grad) of the per-example loss; any model torch.func can differentiate.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import fx, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F


class Factored(NamedTuple):
    """Per-sample weight gradients kept as factors: sample n's gradient is output_grad[n] @ layer_input[n].T (over L
    positions: 1 for a Linear on vectors, the output pixels for a convolution's unfolded input). Its squared norm
    is sum((G^T G) * (U^T U)) over L x L (the "ghost norm", Goodfellow 2015; Li et al. 2022) and a weighted sum over
    samples is one matrix product, so the (samples x out x in) tensor is never written. Used where 2 L^2 < out x in
    (mixed ghost clipping, Bu et al. 2022): every Linear on vectors, and ResNet's deeper convolutions."""

    output_grad: torch.Tensor  # (n, out, L)
    layer_input: torch.Tensor  # (n, in, L)
    shape: tuple[int, ...]  # the weight's shape

    def rows(self) -> torch.Tensor:
        return torch.bmm(self.output_grad, self.layer_input.transpose(1, 2)).view(-1, *self.shape)

    def squared_norms(self) -> torch.Tensor:
        grads = torch.bmm(self.output_grad.transpose(1, 2), self.output_grad)
        inputs = torch.bmm(self.layer_input.transpose(1, 2), self.layer_input)
        return (grads * inputs).sum((1, 2))

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        n, out, positions = self.output_grad.shape
        grads = (self.output_grad * weights[:, None, None]).transpose(0, 1).reshape(out, n * positions)
        return (grads @ self.layer_input.transpose(1, 2).reshape(n * positions, -1)).view(self.shape)


def materialised(grads: torch.Tensor | Factored) -> torch.Tensor:
    """Per-sample gradients as a (samples, *weight shape) tensor, factored or not."""
    return grads.rows() if isinstance(grads, Factored) else grads


def _factored_or_rows(output_grad: torch.Tensor, layer_input: torch.Tensor,
                      shape: tuple[int, ...]) -> torch.Tensor | Factored:
    factored = Factored(output_grad, layer_input, shape)
    positions = output_grad.shape[2]
    return factored if 2 * positions * positions < output_grad.shape[1] * layer_input.shape[1] else factored.rows()


Tensors = dict[str, torch.Tensor]
Grads = dict[str, torch.Tensor | Factored]
PerSample = Callable[[Tensors, Tensors, torch.Tensor, torch.Tensor], tuple[Grads, torch.Tensor]]
LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm)


class NotLayerwise(Exception):
    """The model is outside what `layerwise` handles (it then uses `by_vmap`)."""


def by_vmap(template: nn.Module) -> PerSample:
    """(params, buffers, x, y) -> (per-sample gradients by parameter name, per-sample losses)."""

    def example_loss(params: Tensors, buffers: Tensors, x: torch.Tensor, y: torch.Tensor):
        loss = F.cross_entropy(functional_call(template, (params, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))
        return loss, loss.detach()

    return vmap(grad(example_loss, has_aux=True), in_dims=(None, None, 0, 0))  # type: ignore[return-value]


def layerwise(template: nn.Module, image_shape: tuple[int, ...]) -> PerSample:
    """As `by_vmap`, by one batched backward pass; raises NotLayerwise for models it does not handle."""
    probed, layers = _probed_graph(template)
    modules = dict(template.named_modules())
    shapes = _output_shapes(template, layers, image_shape)

    def per_sample(params: Tensors, buffers: Tensors, x: torch.Tensor, y: torch.Tensor) -> tuple[Grads, torch.Tensor]:
        probes = tuple(x.new_zeros((x.shape[0], *shape)) for shape in shapes)

        def summed_loss(probes: tuple[torch.Tensor, ...]):
            logits, inputs = functional_call(probed, (params, buffers), (x, probes))
            losses = F.cross_entropy(logits, y, reduction="none")
            return losses.sum(), (inputs, losses.detach())

        # samples do not interact, so the gradient of the summed loss at a layer's output is, row by row, each
        # sample's own gradient there
        output_grads, (inputs, losses) = grad(summed_loss, has_aux=True)(probes)
        grads: Grads = {}
        for name, layer_input, output_grad in zip(layers, inputs, output_grads, strict=True):
            for key, value in _layer_grads(modules[name], layer_input, output_grad).items():
                grads[f"{name}.{key}"] = value
        return {name: grads[name] for name in params}, losses

    _check_samples_independent(per_sample, template, image_shape)
    return per_sample


def _check_samples_independent(per_sample: PerSample, template: nn.Module, image_shape: tuple[int, ...]) -> None:
    """Each sample's gradient must not depend on the others in its batch (the algebra above assumes it, and so does
    DP-SGD's sensitivity): two random images together give what each gives alone, or NotLayerwise."""
    device = next(template.parameters()).device
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, *image_shape), generator=generator).to(device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    params = {n: p.detach() for n, p in template.named_parameters() if p.requires_grad}
    buffers = dict(template.named_buffers())
    together, _ = per_sample(params, buffers, x, y)
    alone = [per_sample(params, buffers, x[i:i + 1], y[i:i + 1])[0] for i in range(2)]
    for name, value in together.items():
        each = torch.cat([materialised(a[name]) for a in alone])
        if not torch.allclose(materialised(value), each, rtol=1e-3, atol=1e-5):
            raise NotLayerwise(f"samples in a batch interact (the gradient of {name} depends on the others)")


def _probed_graph(template: nn.Module) -> tuple[fx.GraphModule, list[str]]:
    """The model's graph with `probes[i]` added to the output of its i-th layer, returning (logits, layer inputs)."""
    try:
        traced = fx.symbolic_trace(template)
    except Exception as err:  # noqa: BLE001 -- fx raises many kinds on untraceable code; any means "not here"
        raise NotLayerwise(f"torch.fx cannot trace {type(template).__name__}: {type(err).__name__}") from err
    modules = dict(traced.named_modules())
    graph = traced.graph
    first = next(node for node in graph.nodes if node.op == "placeholder")
    with graph.inserting_after(first):
        probes = graph.placeholder("probes")
    layers: list[str] = []
    inputs = []
    for node in list(graph.nodes):
        # exact types: a subclass may change what its weight means (common.models.StandardizedConv2d), and then
        # this algebra would give the gradient of something else; its weights stay uncovered (vmap instead)
        if node.op != "call_module" or type(modules[node.target]) not in LAYERS:
            continue
        _check_layer(modules[node.target], str(node.target), layers)
        with graph.inserting_after(node):
            probe = graph.call_function(operator.getitem, (probes, len(layers)))
        with graph.inserting_after(probe):
            probed = graph.call_function(operator.add, (node, probe))
        node.replace_all_uses_with(probed, delete_user_cb=lambda user, probed=probed: user is not probed)
        if not node.args:
            raise NotLayerwise(f"layer {node.target} is called without a positional input")
        layers.append(str(node.target))
        inputs.append(node.args[0])
    output = next(node for node in graph.nodes if node.op == "output")
    output.args = ((output.args[0], tuple(inputs)),)
    covered = {f"{layer}.{name}" for layer in layers for name, _ in modules[layer].named_parameters()}
    uncovered = sorted(name for name, p in template.named_parameters() if p.requires_grad and name not in covered)
    if uncovered:
        raise NotLayerwise(f"weights outside Linear, Conv2d and GroupNorm layers: {', '.join(uncovered[:3])}")
    graph.lint()
    traced.recompile()
    return traced, layers


def _check_layer(module: nn.Module, name: str, seen: list[str]) -> None:
    if name in seen:
        raise NotLayerwise(f"layer {name} is used more than once per forward pass")
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                          or isinstance(module.padding, str)):
        raise NotLayerwise(f"convolution {name} has groups, non-zero or named padding")


def _output_shapes(template: nn.Module, layers: list[str], image_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Each layer's output shape for one image, from one forward pass on zeros (outside any compiled graph)."""
    modules = dict(template.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [modules[name].register_forward_hook(
        lambda module, args, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))) for name in layers]
    try:
        with torch.no_grad():
            template(torch.zeros((1, *image_shape), device=next(template.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return [shapes[name] for name in layers]


def _layer_grads(module: nn.Module, layer_input: torch.Tensor, output_grad: torch.Tensor) -> Grads:
    """Per-sample gradients of one layer's weights from its input and the gradient at its output."""
    grads: Grads
    if isinstance(module, nn.Linear):  # on (n, in) or (n, ..., in): positions are the middle dimensions
        inputs, outputs = layer_input.reshape(len(layer_input), -1, module.in_features), output_grad.reshape(
            len(output_grad), -1, module.out_features)
        grads = {"weight": _factored_or_rows(outputs.transpose(1, 2), inputs.transpose(1, 2), module.weight.shape)}
        bias = outputs.sum(1)
    elif isinstance(module, nn.Conv2d):
        columns = F.unfold(layer_input, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)
        grads = {"weight": _factored_or_rows(output_grad.flatten(2), columns, module.weight.shape)}
        bias = output_grad.flatten(2).sum(2)
    else:  # GroupNorm: output = normalised input * weight + bias, per channel
        normalised = F.group_norm(layer_input, module.num_groups, eps=module.eps)
        grads = {"weight": (output_grad * normalised).flatten(2).sum(2)}
        bias = output_grad.flatten(2).sum(2)
    grads["bias"] = bias
    return {key: value for key, value in grads.items() if getattr(module, key, None) is not None}
