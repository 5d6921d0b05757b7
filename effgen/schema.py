"""Column names shared by every stage (DOMAIN.md sections 1 and 2).

The order of FEATURES is the order of the deployed C function's input array;
the order of LABELS is the order of its output array.
"""

CONTINUOUS_FEATURES = [
    "mc_x", "mc_y", "mc_z", "mc_log10_p", "mc_tx", "mc_ty", "mc_eta", "mc_phi",
]
FLAG_FEATURES = ["mc_is_e", "mc_is_mu", "mc_is_h", "mc_charge"]
FEATURES = CONTINUOUS_FEATURES + FLAG_FEATURES

# Training labels (one-hot) and the names Lamarr gives the model outputs.
LABELS = ["not_recoed", "recoed_as_long", "recoed_as_upstream", "recoed_as_downstream"]
OUTPUTS = ["not_recoed", "long", "upstream", "downstream"]

# True class probabilities the synthetic sample was drawn from, same order as LABELS.
TRUTH = ["truth_not_recoed", "truth_long", "truth_upstream", "truth_downstream"]

# LHCb track type of each class, as random_category(not_recoed, 0, 0, long, upstream)
# numbers them; downstream is the remainder (index 5).
TRACK_TYPES = [0, 3, 4, 5]

PID = "mc_pid"
