"""Data: conversion to MDS shards, object storage, and the streaming training reader."""
