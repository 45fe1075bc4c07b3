"""CLIP-ReID's image tower, transcribed plainly for the tests (as ``metrics/reference.py`` is
for re-ranking): Syliz517/CLIP-ReID ``model/clip/model.py`` (``VisionTransformer``,
``ModifiedResNet``, ``build_model``'s ``resize_pos_embed``) and ``model/make_model_clipreid.py``
(which features ``build_transformer.forward`` takes, the SIE offset, the test feature).

Parameter names follow CLIP's (and so open_clip's), so an open_clip image tower's state dict
loads as is. Written from reading the paper's code, kept deliberately naive: no shared code with
``clipid.models``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    """ResidualAttentionBlock: sequence-first tensors (L, N, D), QuickGELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)),
                                              ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Blocks(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])


class ReidViT(nn.Module):
    """CLIP-ReID's VisionTransformer: patches every ``stride`` pixels on an h x w grid."""

    def __init__(self, h_res: int, w_res: int, patch: int, stride: int, width: int, layers: int,
                 heads: int, output_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=stride, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(h_res * w_res + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Blocks(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def forward(self, x: torch.Tensor, cv_emb: torch.Tensor | None = None):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1)
        if cv_emb is not None:
            x[:, 0] = x[:, 0] + cv_emb
        x = x + self.positional_embedding
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)
        blocks = self.transformer.resblocks
        x_last = blocks[:len(blocks) - 1](x)
        x_out = blocks[len(blocks) - 1](x_last)
        x_last = x_last.permute(1, 0, 2)
        x_out = self.ln_post(x_out.permute(1, 0, 2))
        return x_last, x_out, x_out @ self.proj


def resize_pos_embed(posemb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """CLIP-ReID's resize: class row kept, the square grid bilinear to height x width."""
    token, grid = posemb[:1], posemb[1:]
    old = int(math.sqrt(len(grid)))
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bilinear")
    grid = grid.permute(0, 2, 3, 1).reshape(1, height * width, -1)
    return torch.cat([token, grid.squeeze()], dim=0)


def reid_vit(visual_state: dict[str, torch.Tensor], size: tuple[int, int], stride: int,
             heads: int) -> ReidViT:
    """``build_model`` for a ViT: the tower of ``visual_state`` (224-pixel, square grid) at
    ``size`` with patches every ``stride`` pixels."""
    state = dict(visual_state)
    width, _, patch, _ = state["conv1.weight"].shape
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    h_res = (size[0] - patch) // stride + 1
    w_res = (size[1] - patch) // stride + 1
    model = ReidViT(h_res, w_res, patch, stride, width, layers, heads, state["proj"].shape[1])
    state["positional_embedding"] = resize_pos_embed(state["positional_embedding"], h_res, w_res)
    model.load_state_dict(state)
    return model.eval()


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * 4, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool(nn.Module):
    def __init__(self, spacial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(spacial_dim + 1, embed_dim))
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + self.positional_embedding[:, None, :]
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False)
        return x   # every token; CLIP-ReID takes [0]


class ReidResNet(nn.Module):
    """CLIP-ReID's ModifiedResNet: layer4 with stride 1, attention pool over h x w."""

    def __init__(self, layers: list[int], output_dim: int, heads: int, spacial: int,
                 width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.inplanes = width
        self.layer1 = self.make_layer(width, layers[0], 1)
        self.layer2 = self.make_layer(width * 2, layers[1], 2)
        self.layer3 = self.make_layer(width * 4, layers[2], 2)
        self.layer4 = self.make_layer(width * 8, layers[3], 1)
        self.attnpool = AttentionPool(spacial, width * 32, heads, output_dim)

    def make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(self.inplanes, planes, stride)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor):
        for conv, bn in [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]:
            x = F.relu(bn(conv(x)))
        x = self.avgpool(x)
        x3 = self.layer3(self.layer2(self.layer1(x)))
        x4 = self.layer4(x3)
        return x3, x4, self.attnpool(x4)


def reid_resnet(visual_state: dict[str, torch.Tensor], size: tuple[int, int], layers: list[int],
                heads: int) -> ReidResNet:
    """``build_model`` for a ResNet at ``size`` (STRIDE_SIZE 16: a 16-pixel feature grid)."""
    state = dict(visual_state)
    h_res, w_res = (size[0] - 16) // 16 + 1, (size[1] - 16) // 16 + 1
    width = state["layer1.0.conv1.weight"].shape[0]
    model = ReidResNet(layers, state["attnpool.c_proj.weight"].shape[0], heads, h_res * w_res,
                       width)
    state["attnpool.positional_embedding"] = resize_pos_embed(
        state["attnpool.positional_embedding"], h_res, w_res)
    model.load_state_dict(state)
    return model.eval()


def reid_features(model: nn.Module, x: torch.Tensor, cv_emb: torch.Tensor | None = None):
    """``build_transformer.forward``'s three training features and its test feature
    (``NECK_FEAT: before``): ``(last, cls, proj), cat(cls, proj)``."""
    if isinstance(model, ReidResNet):
        x3, x4, xproj = model(x)
        last = F.avg_pool2d(x3, x3.shape[2:4]).view(x.shape[0], -1)
        cls = F.avg_pool2d(x4, x4.shape[2:4]).view(x.shape[0], -1)
        proj = xproj[0]
    else:
        x11, x12, xproj = model(x, cv_emb)
        last, cls, proj = x11[:, 0], x12[:, 0], xproj[:, 0]
    return (last, cls, proj), torch.cat([cls, proj], dim=1)
