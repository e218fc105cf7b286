"""heloco: asynchronous DiLoCo-style training with stale pseudo-gradient correction."""
