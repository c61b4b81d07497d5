"""Running on many devices and hosts: mesh specs and parameter shardings (``sharding``), multi-host start-up and
global batches (``distributed``), and the parameter layouts a model runs in (``layout``)."""
