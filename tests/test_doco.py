"""DoCo passes the method contract (`method_contract.MethodContract`); its own formulas are in test_unlearn.py."""

from method_contract import MethodContract


class TestDoCoContract(MethodContract):
    method = "doco"
    few_steps = {"steps": 3, "warm_up": 1, "batch_size": 1, "lr": 1e-3, "sample_steps": 2, "anchor_images": 2}
    few_steps |= {"retain_images": 2, "adversarial_every": 2, "adversarial_steps": 1}
    lora_steps = {"lr": 1e-2}
    resume_variants = {"adversarial": {}, "plain": {"adversarial_every": 0}}
