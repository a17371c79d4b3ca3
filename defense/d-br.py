"""D-BR (sample distinction by feature sensitivity, then unlearning the poisoned and relearning the
clean samples on the backdoored model) on a BackdoorBench attack record. No clean data.

    python defense/d-br.py --result_file badnet_cifar10
"""
from burnkit.defenses.dbr import DBR

if __name__ == "__main__":
    DBR.main()
