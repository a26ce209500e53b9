"""The suite's own rule: a skip outside the allowed reasons fails."""


def test_a_skip_for_a_reason_outside_the_list_fails_and_a_missing_gpu_skips(pytester):
    pytester.makeconftest("pytest_plugins = ['skip_policy']")
    pytester.makepyfile("""
        import pytest

        def test_late():
            pytest.skip("the run finished before it could be killed")

        def test_gpu():
            pytest.skip("needs a CUDA GPU")
    """)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*skipped for a reason outside*the run finished before it could be killed*"])


def test_a_module_skipped_while_collected_fails_too(pytester):
    pytester.makeconftest("pytest_plugins = ['skip_policy']")
    pytester.makepyfile(test_absent="""
        import pytest

        pytest.importorskip("a_module_that_is_not_there")

        def test_never():
            pass
    """)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped while collected*a_module_that_is_not_there*"])
