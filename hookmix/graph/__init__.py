"""What hookmix reads from a network's graph (torch.fx): its cut points and named layers, each layer's
activation layout, which mix points are equivalent, splitting a model at a point, and building a backbone
by name."""
