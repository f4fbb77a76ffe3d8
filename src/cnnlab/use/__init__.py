"""Using a trained run: preparing a user's picture the way the dataset was made (`recipes`),
predicting (`predict`), exporting (`export`) and the web demo (`serve`)."""
