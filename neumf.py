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
            mlp = F.dropout(F.relu(layer(mlp)), self.dropout, self.training)
        return self.final(torch.cat([mf, mlp], dim=1))
