"""Models: one description per layer kind (`layers`), a config's layer plan in the lesson's order
(`plan`: shapes, parameters, multiply-adds; no torch), the torch network built from that plan (`cnn`),
and the Keras-style summary of a plan (`summary`)."""
