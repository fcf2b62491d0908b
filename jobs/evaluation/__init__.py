"""``clipn evaluate`` (``evaluate``) and ``clipn calibrate`` (``calibrate``): labelled sets and ID samples scored
in this process (``local_scoring``) and their reports rendered (``report``). Reading a calibration and checking
that it fits a run is :mod:`jobs.calibration`, outside this package, because the nightly scoring job needs it too."""
