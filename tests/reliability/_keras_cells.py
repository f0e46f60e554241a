"""The user cell of the Keras reliability tests: ``s_t = s_{t-1} + 0.5 tanh(x_t W +
s_{t-1} U + b)``, whose residual is the identity; registered so that models holding it
save and load."""

import keras


@keras.saving.register_keras_serializable(package="hwbptt_reliability")
class ResidualCell(keras.layers.Layer):
    """A user cell ``s_t = s_{t-1} + 0.5 tanh(x_t W + s_{t-1} U + b)`` (residual "identity")."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(self.units, self.units), name="recurrent_kernel")
        self.bias = self.add_weight(shape=(self.units,), name="bias", initializer="zeros")

    def call(self, inputs, states):
        s = states[0]
        k = keras.ops
        new = s + 0.5 * k.tanh(k.matmul(inputs, self.kernel) + k.matmul(s, self.recurrent_kernel) + self.bias)
        return new, [new]

    def get_config(self):
        return {**super().get_config(), "units": self.units}
