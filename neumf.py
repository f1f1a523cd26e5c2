"""The NeuMF model of "Neural Collaborative Filtering" (He et al., 2017), with the reference layout.

Two branches share the (user, item) input: matrix factorisation (element-wise product of
embeddings) and an MLP over concatenated embeddings. A final linear layer combines them into a
logit. Parameter names and shapes match NVIDIA's reference, so its model.pth files load.
"""

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x, p, training):
    """F.dropout, with a cheaper mask on CPU.

    torch's CPU Bernoulli sampler is single-threaded and took a quarter of a training step here;
    instead, one 64-bit random draw gives the 16-bit random numbers of four elements. The keep
    probability is rounded to a multiple of 2^-16 and survivors are scaled by its inverse.
    """
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    keep = round((1 - p) * 2**16)
    bits = torch.empty(x.numel() // 4 + 1, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    uniform = bits.view(torch.int16)[: x.numel()].view(x.shape)  # uniform on [-2^15, 2^15)
    return x * ((uniform < keep - 2**15).to(x.dtype) * (2**16 / keep))


class NeuMF(nn.Module):
    def __init__(self, nb_users, nb_items, mf_dim=64, mlp_layer_sizes=(256, 256, 128, 64), dropout=0.5):
        super().__init__()
        if mlp_layer_sizes[0] % 2:
            raise ValueError(f"the first MLP layer size must be even (user and item halves), got {mlp_layer_sizes[0]}")
        self.dropout = dropout
        self.mf_user_embed = nn.Embedding(nb_users, mf_dim)
        self.mf_item_embed = nn.Embedding(nb_items, mf_dim)
        self.mlp_user_embed = nn.Embedding(nb_users, mlp_layer_sizes[0] // 2)
        self.mlp_item_embed = nn.Embedding(nb_items, mlp_layer_sizes[0] // 2)
        self.mlp = nn.ModuleList(nn.Linear(fan_in, fan_out) for fan_in, fan_out in itertools.pairwise(mlp_layer_sizes))
        self.final = nn.Linear(mf_dim + mlp_layer_sizes[-1], 1)
        self.reset_parameters()

    def reset_parameters(self):
        """The reference initialisation: N(0, 0.01) embeddings, Glorot MLP, LeCun final weight."""
        for embedding in (self.mf_user_embed, self.mf_item_embed, self.mlp_user_embed, self.mlp_item_embed):
            nn.init.normal_(embedding.weight, 0.0, 0.01)
        for layer in self.mlp:
            nn.init.xavier_uniform_(layer.weight)
        bound = math.sqrt(3.0 / self.final.in_features)
        nn.init.uniform_(self.final.weight, -bound, bound)

    def forward(self, user, item):
        """Logits of shape [batch, 1] for 1-D tensors of user and item ids."""
        mf = self.mf_user_embed(user) * self.mf_item_embed(item)
        mlp = torch.cat([self.mlp_user_embed(user), self.mlp_item_embed(item)], dim=1)
        for layer in self.mlp:
            mlp = dropout(F.relu(layer(mlp)), self.dropout, self.training)
        return self.final(torch.cat([mf, mlp], dim=1))

    def score_grid(self, users, items, chunk_pairs=None):
        """Evaluation logits [U, C] of users [U] against items [C] (shared) or [U, C] (per user).

        Same values as forward() in eval mode, computed faster: the first MLP layer is linear in
        the concatenated embeddings, so its user half runs once per user and its item half once
        per catalogue item; only the later layers run per (user, item) pair, for a few users at a
        time (about chunk_pairs pairs: by default 2^13 on CPU, where the per-pair tensors then stay
        in cache, and 2^20 elsewhere, where each chunk is a few large kernels).

        A user's row is bit-identical whichever users are scored with it (blocks of any size, any
        number of processes; tested on CPU): the item table's matrix product has a fixed shape, the
        per-pair ones have at least C rows (MKL rounds a row differently only in products of fewer
        than about a dozen rows), and the user half and the final layer are products and sums,
        whose rows are reduced one by one (a matrix-vector product also rounds by row count).
        """
        shared = items.dim() == 1
        n_candidates = items.shape[-1]
        mf_dim = self.mf_user_embed.embedding_dim
        final_mf, final_mlp = self.final.weight[0, :mf_dim], self.final.weight[0, mf_dim:]
        user_mf = self.mf_user_embed(users) * final_mf
        user_mlp = self.mlp_user_embed(users)
        half = user_mlp.shape[1]
        if self.mlp:
            first = self.mlp[0]
            user_part = _rowwise_linear(user_mlp, first.weight[:, :half]) + first.bias
            item_table = F.linear(self.mlp_item_embed.weight, first.weight[:, half:])  # [n_items, hidden]
            user_part = user_part.to(item_table.dtype)  # bf16 under autocast: the next layer's input type
        else:  # no hidden layer: the MLP output is the concatenation itself
            user_part = (user_mlp * final_mlp[:half]).sum(-1, keepdim=True)
            item_table = (self.mlp_item_embed.weight * final_mlp[half:]).sum(-1, keepdim=True)
        if shared:
            item_mf, item_part = self.mf_item_embed(items), item_table[items]
        logits = torch.empty(len(users), n_candidates, device=user_mf.device)
        chunk_pairs = chunk_pairs or (2**13 if users.device.type == "cpu" else 2**20)
        per_chunk = max(1, chunk_pairs // max(1, n_candidates))
        for start in range(0, len(users), per_chunk):
            rows = slice(start, start + per_chunk)
            if not shared:
                item_mf, item_part = self.mf_item_embed(items[rows]), item_table[items[rows]]
                hidden = item_part.add_(user_part[rows, None, :])  # a gathered copy: added in place
            else:
                hidden = item_part + user_part[rows, None, :]
            scores = (item_mf * user_mf[rows, None, :]).sum(-1)
            if self.mlp:
                hidden.relu_()
                for layer in self.mlp[1:]:
                    hidden = F.linear(hidden, layer.weight, layer.bias).relu_()
                scores += (hidden * final_mlp).sum(-1)
            else:
                scores += hidden[..., 0]
            logits[rows] = scores + self.final.bias
        return logits


def _rowwise_linear(x, weight, rows=16):
    """x @ weight.T as products and sums, a few rows at a time: each row's result is the same
    whatever rows come with it (a matrix product over fewer than about a dozen rows rounds otherwise)."""
    parts = [(part[:, None, :] * weight).sum(-1) for part in x.split(rows)]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[0])
