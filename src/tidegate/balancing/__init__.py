"""Load balancing: endpoint choice (algorithms, balancer), endpoint and backend state, passive (outlier) and
active health, and retry rules with their budget."""
