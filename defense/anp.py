"""ANP (Adversarial Neuron Pruning) on a BackdoorBench attack record.

    python defense/anp.py --result_file badnet_cifar10 --yaml_path config/defense/anp/cifar10.yaml --dataset cifar10
"""
from burnkit.defenses.anp import AdversarialNeuronPruning

if __name__ == "__main__":
    AdversarialNeuronPruning.main()
