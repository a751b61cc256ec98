"""Tensor parallelism: one engine over N devices (Megatron-LM sharding, S-LoRA section 6).

- :mod:`.shard`: what one rank holds of the model and of every adapter (:class:`Shard`).
- :mod:`.comm`: the collectives of one rank's forward pass (:class:`TPComm`).
- :mod:`.host_weights`: an adapter's host copy in shared memory, one per machine.
- :mod:`.messages`: what the driver and the workers send each other.
- :mod:`.worker`: a worker process (its shard of the model and its pool).
- :mod:`.executor`: the driver's side (:class:`TensorParallelExecutor`, the engine's runner).
"""
