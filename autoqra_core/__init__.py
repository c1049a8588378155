"""AutoQRA core: the method as a plain library (no orchestration, no I/O services).

Modules, in the order the method uses them:
space -> memory -> importance -> repair -> evolution / surrogate / fidelity -> turbo,
with model, data, quantize and finetune building and scoring one configuration.
"""
