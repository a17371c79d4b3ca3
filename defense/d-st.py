"""D-ST (sample distinction by feature sensitivity, then secure training from scratch: a contrastive
encoder and a mixed-CE head) on a BackdoorBench attack record. No clean data.

    python defense/d-st.py --result_file badnet_cifar10
"""
from burnkit.defenses.dst import DST

if __name__ == "__main__":
    DST.main()
