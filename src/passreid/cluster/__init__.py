"""Pseudo labels for unsupervised re-ID: exact kNN, sparse k-reciprocal Jaccard distance, sparse DBSCAN.

The k-reciprocal machinery (:mod:`passreid.cluster.kreciprocal`) is shared with the evaluation's
re-ranking (:func:`passreid.eval.rerank.re_ranking`).
"""
from passreid.cluster.dbscan import NoClustersError, dbscan_from_graph, dbscan_pseudo_labels
from passreid.cluster.jaccard import jaccard_sparse
from passreid.cluster.knn import knn, knn_with_farthest

__all__ = ["NoClustersError", "dbscan_from_graph", "dbscan_pseudo_labels", "jaccard_sparse", "knn", "knn_with_farthest"]
