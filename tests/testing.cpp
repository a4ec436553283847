// The source of moelab_test_pch (tests/CMakeLists.txt): the target exists to build the suites'
// precompiled header; this file only gives it something to compile.
