"""The three instantiations of "Neural Collaborative Filtering" (He et al., 2017): NeuMF, GMF and MLP.

NeuMF has two branches over the (user, item) input: generalized matrix factorisation (GMF, the
element-wise product of embeddings) and an MLP over concatenated embeddings; a final linear layer
combines them into a logit. GMF and MLP are one branch each with its own final layer. Parameter
names and shapes are the reference's (a GMF holds the `mf_*` and `final.*` tensors of a NeuMF, an
MLP the `mlp_*`, `mlp.*` and `final.*` ones), so the reference's model.pth files load and NeuMF can
be initialised from a trained GMF and MLP (pre-training, as in the paper).
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


MODELS = ("neumf", "gmf", "mlp")


class NeuMF(nn.Module):
    """NeuMF, or one of its branches alone: kind "gmf" (MF branch) or "mlp" (MLP branch)."""

    def __init__(self, nb_users, nb_items, mf_dim=64, mlp_layer_sizes=(256, 256, 128, 64), dropout=0.5, kind="neumf"):
        super().__init__()
        if kind not in MODELS:
            raise ValueError(f"the model kind must be one of {MODELS}, got {kind!r}")
        if kind != "gmf" and mlp_layer_sizes[0] % 2:
            raise ValueError(f"the first MLP layer size must be even (user and item halves), got {mlp_layer_sizes[0]}")
        self.kind, self.dropout = kind, dropout
        self.has_mf, self.has_mlp = kind != "mlp", kind != "gmf"
        final_in = 0
        if self.has_mf:
            self.mf_user_embed = nn.Embedding(nb_users, mf_dim)
            self.mf_item_embed = nn.Embedding(nb_items, mf_dim)
            final_in += mf_dim
        if self.has_mlp:
            self.mlp_user_embed = nn.Embedding(nb_users, mlp_layer_sizes[0] // 2)
            self.mlp_item_embed = nn.Embedding(nb_items, mlp_layer_sizes[0] // 2)
            pairs = itertools.pairwise(mlp_layer_sizes)
            self.mlp = nn.ModuleList(nn.Linear(fan_in, fan_out) for fan_in, fan_out in pairs)
            final_in += mlp_layer_sizes[-1]
        self.final = nn.Linear(final_in, 1)
        self.reset_parameters()

    def embeddings(self):
        """(user table, item table) of each branch."""
        branches = [(self.mf_user_embed, self.mf_item_embed)] if self.has_mf else []
        return branches + ([(self.mlp_user_embed, self.mlp_item_embed)] if self.has_mlp else [])

    def reset_parameters(self):
        """The reference initialisation: N(0, 0.01) embeddings, Glorot MLP, LeCun final weight."""
        for user_table, item_table in self.embeddings():
            nn.init.normal_(user_table.weight, 0.0, 0.01)
            nn.init.normal_(item_table.weight, 0.0, 0.01)
        for layer in self.mlp if self.has_mlp else ():
            nn.init.xavier_uniform_(layer.weight)
        bound = math.sqrt(3.0 / self.final.in_features)
        nn.init.uniform_(self.final.weight, -bound, bound)

    def forward(self, user, item):
        """Logits of shape [batch, 1] for 1-D tensors of user and item ids."""
        branches = []
        if self.has_mf:
            branches.append(self.mf_user_embed(user) * self.mf_item_embed(item))
        if self.has_mlp:
            mlp = torch.cat([self.mlp_user_embed(user), self.mlp_item_embed(item)], dim=1)
            for layer in self.mlp:
                mlp = dropout(F.relu(layer(mlp)), self.dropout, self.training)
            branches.append(mlp)
        return self.final(torch.cat(branches, dim=1) if len(branches) > 1 else branches[0])

    @torch.no_grad()
    def init_from_pretrained(self, gmf, mlp, alpha):
        """Start NeuMF from a trained GMF and MLP (the NCF paper's pre-training).

        Embeddings and MLP are copied; the final layer weighs the GMF's final layer by alpha and the
        MLP's by 1 - alpha (bias included), so the first logits are alpha * GMF's + (1 - alpha) * MLP's.
        """
        own = self.state_dict()
        for name, tensor in [*gmf.state_dict().items(), *mlp.state_dict().items()]:
            if not name.startswith("final."):
                own[name].copy_(tensor)
        mf_dim = gmf.final.in_features
        self.final.weight[:, :mf_dim] = alpha * gmf.final.weight
        self.final.weight[:, mf_dim:] = (1 - alpha) * mlp.final.weight
        self.final.bias.copy_(alpha * gmf.final.bias + (1 - alpha) * mlp.final.bias)

    def embedding_l2(self, user, item):
        """Sum over the batch of the squared norms of the embedding rows each sample uses.

        The L2 penalty of per-sample SGD (as in Rendle et al.'s MF): a row is penalised as often as
        it is used, and rows a batch does not touch get no gradient, unlike weight decay.
        """
        total = 0.0
        for user_table, item_table in self.embeddings():
            total = total + user_table(user).float().pow(2).sum() + item_table(item).float().pow(2).sum()
        return total

    def catalogue_logits(self, users, items):
        """Logits [U, C] of users [U] against items [C] (shared): forward() of every pair, dropout
        included in training mode, with gradients (the softmax losses train on them).

        The MF branch is one matrix product; the first MLP layer runs its user half once per user and
        its item half once per item, the later layers per pair: an MLP holds U * C * (its widest
        hidden layer) activations, so the caller scores a few users at a time.
        """
        mf_dim = self.mf_user_embed.embedding_dim if self.has_mf else 0
        final_mf, final_mlp = self.final.weight[0, :mf_dim], self.final.weight[0, mf_dim:]
        logits = self.final.bias
        if self.has_mf:
            logits = logits + (self.mf_user_embed(users) * final_mf) @ self.mf_item_embed(items).T
        if self.has_mlp:
            user_mlp, item_mlp = self.mlp_user_embed(users), self.mlp_item_embed(items)
            half = user_mlp.shape[1]
            if not self.mlp:  # the MLP output is the concatenated embeddings
                return logits + (user_mlp @ final_mlp[:half])[:, None] + item_mlp @ final_mlp[half:]
            first = self.mlp[0]
            hidden = F.linear(user_mlp, first.weight[:, :half], first.bias)[:, None, :]
            hidden = hidden + F.linear(item_mlp, first.weight[:, half:])
            for layer in self.mlp:
                if layer is not first:
                    hidden = layer(hidden)
                hidden = dropout(F.relu(hidden), self.dropout, self.training)
            logits = logits + hidden @ final_mlp
        return logits

    def score_grid(self, users, items, chunk_pairs=None):
        """Evaluation logits [U, C] of users [U] against items [C] (shared) or [U, C] (per user).

        Same values as forward() in eval mode, computed faster: the first MLP layer is linear in
        the concatenated embeddings, so its user half runs once per user and its item half once
        per catalogue item; only the later layers run per (user, item) pair, for a few users at a
        time (about chunk_pairs pairs: by default 2^13 on CPU, where the per-pair tensors then stay
        in cache, and 2^20 elsewhere, where each chunk is a few large kernels).

        On CPU a user's row is bit-identical whichever users are scored with it (blocks of any size,
        any number of processes; tested): the item table's matrix product has a fixed shape, the
        per-pair ones have at least C rows (MKL rounds a row differently only in products of fewer
        than about a dozen rows), and the user half and the final layer are products and sums,
        whose rows are reduced one by one (a matrix-vector product also rounds by row count). On a
        GPU the user half is one plain matrix product instead, which does not promise this.
        """
        shared = items.dim() == 1
        n_candidates = items.shape[-1]
        mf_dim = self.mf_user_embed.embedding_dim if self.has_mf else 0
        final_mf, final_mlp = self.final.weight[0, :mf_dim], self.final.weight[0, mf_dim:]
        if self.has_mf:
            user_mf = self.mf_user_embed(users) * final_mf
            item_mf = self.mf_item_embed(items) if shared else None
        if self.has_mlp:
            user_part, item_table = self._first_layer_halves(users, final_mlp)
            item_part = item_table[items] if shared else None
        logits = torch.empty(len(users), n_candidates, device=users.device)
        chunk_pairs = chunk_pairs or (2**13 if users.device.type == "cpu" else 2**20)
        per_chunk = max(1, chunk_pairs // max(1, n_candidates))
        for start in range(0, len(users), per_chunk):
            rows = slice(start, start + per_chunk)
            scores = None
            if self.has_mf:
                chunk_mf = item_mf if shared else self.mf_item_embed(items[rows])
                scores = (chunk_mf * user_mf[rows, None, :]).sum(-1)
            if self.has_mlp:
                if shared:
                    hidden = item_part + user_part[rows, None, :]
                else:  # a gathered copy: added in place
                    hidden = item_table[items[rows]].add_(user_part[rows, None, :])
                mlp_scores = self._mlp_head(hidden, final_mlp)
                scores = mlp_scores if scores is None else scores.add_(mlp_scores)
            logits[rows] = scores + self.final.bias
        return logits

    def _first_layer_halves(self, users, final_mlp):
        """The user half of the first MLP layer for `users`, and its item half for every item.

        Without hidden layers the MLP output is the concatenated embeddings: the halves are then
        their dot products with the final layer's weights.
        """
        user_mlp = self.mlp_user_embed(users)
        half = user_mlp.shape[1]
        if not self.mlp:
            user_part = (user_mlp * final_mlp[:half]).sum(-1, keepdim=True)
            return user_part, (self.mlp_item_embed.weight * final_mlp[half:]).sum(-1, keepdim=True)
        first = self.mlp[0]
        user_weight = first.weight[:, :half]
        if users.device.type == "cpu":
            user_part = _rowwise_linear(user_mlp, user_weight) + first.bias
        else:  # one kernel, not one per 16 users (the row-by-row guarantee above is a CPU one)
            user_part = F.linear(user_mlp, user_weight, first.bias)
        item_table = F.linear(self.mlp_item_embed.weight, first.weight[:, half:])  # [n_items, hidden]
        return user_part.to(item_table.dtype), item_table  # bf16 under autocast: the next layer's input type

    def _mlp_head(self, hidden, final_mlp):
        """The MLP branch's contribution to the logits, from the first layer's pre-activation."""
        if not self.mlp:
            return hidden[..., 0]
        hidden.relu_()
        for layer in self.mlp[1:]:
            hidden = F.linear(hidden, layer.weight, layer.bias).relu_()
        return (hidden * final_mlp).sum(-1)


def _rowwise_linear(x, weight, rows=16):
    """x @ weight.T as products and sums, a few rows at a time: each row's result is the same
    whatever rows come with it (a matrix product over fewer than about a dozen rows rounds otherwise)."""
    parts = [(part[:, None, :] * weight).sum(-1) for part in x.split(rows)]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[0])
