"""Tests of tinyvlm.evaluation."""
