"""Other inference engines that run our drafting (vLLM for scale-out); nothing below imports this package."""
