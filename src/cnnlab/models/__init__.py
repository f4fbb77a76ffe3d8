"""Models: a config's layer plan (`plan`: shapes, parameters, multiply-adds; no torch), the torch
network built from that plan (`cnn`), and the Keras-style summary of a plan (`summary`)."""
