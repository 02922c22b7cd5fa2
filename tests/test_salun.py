"""SalUn passes the method contract (`method_contract.MethodContract`); its own formulas are in test_unlearn.py."""

from method_contract import MethodContract


class TestSalUnContract(MethodContract):
    method = "salun"
    few_steps = {"steps": 3, "batch_size": 1, "lr": 1e-3, "sample_steps": 2, "forget_images": 2, "retain_images": 2}
    few_steps |= {"adversarial_every": 2, "adversarial_steps": 1}
    resume_variants = {"adversarial": {}, "plain": {"adversarial_every": 0}}
