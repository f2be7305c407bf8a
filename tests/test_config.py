"""Agent configuration: value parsers, the file < env < flags precedence, and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from coldbrew.agent.config import (
    SETTINGS,
    SizeOrPercent,
    load_config,
    parse_address,
    parse_bool,
    parse_chunk_size,
    parse_group,
    parse_mode,
    parse_origin,
    parse_size_or_percent,
)
from coldbrew.agent.errors import ConfigError
from coldbrew.agent.units import GiB, KiB, MiB, TiB, format_size, parse_size

# endpoint_url and region are (wrongly) required today: see
# test_endpoint_and_region_are_optional. Every other test supplies them.
AWS = {"AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_REGION": "us-east-1"}
ORIGIN_ENV = {"COLDBREW_ORIGIN": "s3://models", **AWS}


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


# --- parse_size ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("0", 0),
    ("1000000", 1_000_000),
    ("17b", 17),
    ("1k", 1000), ("1KB", 1000), ("2 MB", 2_000_000), ("3GB", 3 * 1000**3), ("1tb", 1000**4),
    ("1Ki", KiB), ("1KiB", KiB), ("16MiB", 16 * MiB), ("16 mib", 16 * MiB),
    ("500GiB", 500 * GiB), ("2TiB", 2 * TiB), ("1.5GiB", 3 * GiB // 2),
    ("  64KiB  ", 64 * KiB),
])
def test_parse_size_accepts_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected


def test_parse_size_passes_integers_through():
    assert parse_size(4096) == 4096
    assert parse_size(0) == 0


@pytest.mark.parametrize("text", ["", "abc", "12 parsecs", "-5", "5-MiB", "1e9", "MiB", "1.5.5GiB",
                                  "16 MiB B"])
def test_parse_size_rejects_non_sizes_with_an_example(text):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)
    assert "16MiB" in str(info.value)


def test_parse_size_rejects_negative_integers():
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)


def test_format_size_uses_binary_units():
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(16 * MiB) == "16.0 MiB"
    assert format_size(5000 * TiB) == "5000.0 TiB"


# --- parse_size_or_percent ------------------------------------------------------------------


def test_size_or_percent_parses_a_percentage():
    value = parse_size_or_percent(" 80% ")
    assert value == SizeOrPercent(percent=80.0)
    assert value.resolve(1000) == 800


def test_size_or_percent_parses_a_size():
    value = parse_size_or_percent("500GiB")
    assert value == SizeOrPercent(bytes=500 * GiB)
    assert value.resolve(1) == 500 * GiB  # a byte count ignores the filesystem size


def test_size_or_percent_accepts_bounds_and_fractions():
    assert parse_size_or_percent("0%").resolve(10**12) == 0
    assert parse_size_or_percent("100%").resolve(12345) == 12345
    assert parse_size_or_percent("12.5%").resolve(800) == 100
    assert parse_size_or_percent(0).resolve(999) == 0


@pytest.mark.parametrize("text", ["101%", "-1%", "150.5%"])
def test_size_or_percent_rejects_out_of_range_percentages(text):
    with pytest.raises(ValueError, match="between 0% and 100%"):
        parse_size_or_percent(text)


@pytest.mark.parametrize("text", ["lots%", "%", "12 parsecs"])
def test_size_or_percent_rejects_garbage(text):
    with pytest.raises(ValueError):
        parse_size_or_percent(text)


# --- parse_chunk_size -------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("64KiB", 64 * KiB), ("1MiB", MiB), ("16MiB", 16 * MiB), ("1GiB", GiB), (4 * MiB, 4 * MiB),
])
def test_chunk_size_accepts_powers_of_two_in_bounds(text, expected):
    assert parse_chunk_size(text) == expected


@pytest.mark.parametrize("text", [
    "32KiB",            # below 64 KiB
    "2GiB",             # above 1 GiB
    "1MB",              # decimal: not a power of two
    "3MiB", 3 * MiB,    # not a power of two
    0, "0",
])
def test_chunk_size_rejects_non_powers_of_two_and_out_of_bounds(text):
    with pytest.raises(ValueError, match="power of two between 64KiB and 1GiB"):
        parse_chunk_size(text)


# --- parse_address, parse_bool, parse_origin --------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("0.0.0.0:9400", ("0.0.0.0", 9400)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    (":9400", ("0.0.0.0", 9400)),
    ("localhost:65535", ("localhost", 65535)),
    ("[::1]:8080", ("::1", 8080)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9400", "host:", "host:port", "host:65536", "host:-1", ""])
def test_parse_address_rejects_bad_addresses(text):
    with pytest.raises(ValueError, match="is not host:port"):
        parse_address(text)


def test_socket_mode_and_group_parse_and_default():
    assert parse_mode("0666") == 0o666 and parse_mode("660") == 0o660 and parse_mode(0o600) == 0o600
    assert parse_group("0") == 0 and parse_group("root") == 0 and parse_group("") is None
    cfg = load_config(env={**ORIGIN_ENV, "COLDBREW_SOCKET_GROUP": "65534", "COLDBREW_SOCKET_MODE": "0666"})
    assert cfg.socket_group == 65534 and cfg.socket_mode == 0o666
    cfg = load_config(env=ORIGIN_ENV)
    assert cfg.socket_mode == 0o660 and cfg.socket_group is None


@pytest.mark.parametrize("text, message", [("rw-rw----", "not an octal file mode"),
                                           ("0999", "not an octal file mode"),
                                           ("01777", "between 0000 and 0777")])
def test_bad_socket_modes_say_what_a_mode_looks_like(text, message):
    with pytest.raises(ConfigError, match=f"socket_mode: .*{message}.*COLDBREW_SOCKET_MODE"):
        load_config(env={**ORIGIN_ENV, "COLDBREW_SOCKET_MODE": text})


def test_unknown_socket_group_is_named():
    with pytest.raises(ConfigError, match="socket_group: no group named 'no-such-group-cb'"):
        load_config(env={**ORIGIN_ENV, "COLDBREW_SOCKET_GROUP": "no-such-group-cb"})


@pytest.mark.parametrize("text", ["1", "true", "TRUE", " yes ", "on", True])
def test_parse_bool_true(text):
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["0", "false", "False", "no", "OFF", False])
def test_parse_bool_false(text):
    assert parse_bool(text) is False


@pytest.mark.parametrize("text", ["", "maybe", "2", "y"])
def test_parse_bool_rejects_other_words(text):
    with pytest.raises(ValueError, match="is not a boolean"):
        parse_bool(text)


@pytest.mark.parametrize("text, expected", [
    ("s3://bucket", "s3://bucket"),
    ("s3://bucket/prefix/", "s3://bucket/prefix/"),
    (" s3://bucket/p ", "s3://bucket/p"),
    ("/srv/models", "file:///srv/models"),
    ("file:///srv/models", "file:///srv/models"),
    ("gs://other/store", "gs://other/store"),
])
def test_parse_origin(text, expected):
    assert parse_origin(text) == expected


def test_parse_origin_rejects_a_relative_path():
    with pytest.raises(ValueError, match="is not a URL"):
        parse_origin("models/llama")


@pytest.mark.parametrize("text", ["s3://", "s3:///", "s3:////"])
def test_parse_origin_rejects_s3_without_bucket(text):
    with pytest.raises(ValueError, match="names no bucket"):
        parse_origin(text)


# --- load_config: sources and precedence ----------------------------------------------------------


def test_defaults_apply_when_only_origin_is_given():
    cfg = load_config(env=ORIGIN_ENV)
    assert cfg.origin == "s3://models"
    assert cfg.chunk_size == 16 * MiB
    assert cfg.cache_size == SizeOrPercent(percent=90.0)
    assert cfg.cache_reserve == SizeOrPercent(bytes=GiB)
    assert cfg.metrics_address == ("0.0.0.0", 9400)
    assert cfg.retry_attempts == 8
    assert cfg.anonymous is False and cfg.check_origin is True
    assert cfg.endpoint_url == "http://127.0.0.1:8333" and cfg.region == "us-east-1"
    assert cfg.log_format == "json" and cfg.log_level == "INFO"
    assert cfg.cache_dir == Path("/var/lib/coldbrew/cache")


def test_every_setting_has_env_and_flag_derived_from_its_name():
    for s in SETTINGS:
        assert s.env == "COLDBREW_" + s.name.upper()
        assert s.flag == "--" + s.name.replace("_", "-")


def test_file_values_are_parsed(tmp_path):
    path = write_toml(tmp_path, """
origin = "s3://from-file/prefix"
cache_size = "500GiB"
cache_reserve = "5%"
chunk_size = 4194304
anonymous = true
cache_dir = "/nvme/cache"
metrics_address = "127.0.0.1:0"
retry_base_delay_s = 0.5
log_level = "debug"
log_format = "text"
""")
    cfg = load_config(file=path, env=AWS)
    assert cfg.origin == "s3://from-file/prefix"
    assert cfg.cache_size == SizeOrPercent(bytes=500 * GiB)
    assert cfg.cache_reserve == SizeOrPercent(percent=5.0)
    assert cfg.chunk_size == 4 * MiB
    assert cfg.anonymous is True
    assert cfg.cache_dir == Path("/nvme/cache")
    assert cfg.metrics_address == ("127.0.0.1", 0)
    assert cfg.retry_base_delay_s == 0.5
    assert cfg.log_level == "DEBUG"
    assert cfg.log_format == "text"


def test_agent_table_form_of_the_file(tmp_path):
    path = write_toml(tmp_path, """
[agent]
origin = "s3://tabled"
chunk_size = "1MiB"
fetch_concurrency = 3

[prewarm]
uris = ["s3://tabled/llama/"]
""")
    cfg = load_config(file=path, env=AWS)
    assert cfg.origin == "s3://tabled"
    assert cfg.chunk_size == MiB
    assert cfg.fetch_concurrency == 3


def test_a_prewarm_key_in_the_file_is_not_an_unknown_key(tmp_path):
    path = write_toml(tmp_path, 'origin = "s3://b"\nprewarm = ["s3://b/x"]\n')
    assert load_config(file=path, env=AWS).origin == "s3://b"


def test_env_overrides_file_and_flags_override_env(tmp_path):
    path = write_toml(tmp_path, """
origin = "s3://file"
cache_size = "100GiB"
chunk_size = "1MiB"
fetch_concurrency = 2
""")
    env = {**AWS, "COLDBREW_CACHE_SIZE": "200GiB", "COLDBREW_CHUNK_SIZE": "2MiB"}
    flags = {"chunk_size": "4MiB", "fetch_concurrency": None}
    cfg = load_config(file=path, env=env, flags=flags)
    assert cfg.origin == "s3://file"                        # file only
    assert cfg.cache_size == SizeOrPercent(bytes=200 * GiB)  # env beats file
    assert cfg.chunk_size == 4 * MiB                         # flag beats env and file
    assert cfg.fetch_concurrency == 2                        # a None flag is "not given"


def test_flags_override_file_without_env(tmp_path):
    path = write_toml(tmp_path, 'origin = "s3://file"\n')
    cfg = load_config(file=path, env=AWS, flags={"origin": "s3://flag"})
    assert cfg.origin == "s3://flag"


def test_empty_env_value_counts_as_unset(tmp_path):
    path = write_toml(tmp_path, 'origin = "s3://file"\nlog_level = "ERROR"\n')
    cfg = load_config(file=path, env={**AWS, "COLDBREW_ORIGIN": "", "COLDBREW_LOG_LEVEL": ""})
    assert cfg.origin == "s3://file"
    assert cfg.log_level == "ERROR"


def test_env_is_read_from_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("COLDBREW_ORIGIN", "s3://from-os-environ")
    monkeypatch.setenv("COLDBREW_RETRY_ATTEMPTS", "3")
    for var, value in AWS.items():
        monkeypatch.setenv(var, value)
    cfg = load_config()
    assert cfg.origin == "s3://from-os-environ"
    assert cfg.retry_attempts == 3


def test_aws_env_aliases_fill_endpoint_and_region():
    cfg = load_config(env={"COLDBREW_ORIGIN": "s3://m", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                           "AWS_REGION": "eu-west-3"})
    assert cfg.endpoint_url == "http://127.0.0.1:9"
    assert cfg.region == "eu-west-3"


def test_aws_default_region_is_a_fallback_alias():
    cfg = load_config(env={"COLDBREW_ORIGIN": "s3://m", "AWS_ENDPOINT_URL": "http://e",
                           "AWS_DEFAULT_REGION": "us-east-2"})
    assert cfg.region == "us-east-2"


def test_specific_aws_alias_wins_over_generic_one():
    cfg = load_config(env={"COLDBREW_ORIGIN": "s3://m", "AWS_ENDPOINT_URL": "http://generic",
                           "AWS_ENDPOINT_URL_S3": "http://s3-specific",
                           "AWS_DEFAULT_REGION": "us-east-2", "AWS_REGION": "eu-west-3"})
    assert cfg.endpoint_url == "http://s3-specific"
    assert cfg.region == "eu-west-3"


def test_coldbrew_env_wins_over_aws_aliases():
    cfg = load_config(env={"COLDBREW_ORIGIN": "s3://m", "AWS_ENDPOINT_URL": "http://aws",
                           "COLDBREW_ENDPOINT_URL": "http://coldbrew",
                           "AWS_REGION": "aws-region", "COLDBREW_REGION": "coldbrew-region"})
    assert cfg.endpoint_url == "http://coldbrew"
    assert cfg.region == "coldbrew-region"


def test_aws_alias_overrides_the_file(tmp_path):
    path = write_toml(tmp_path, 'origin = "s3://b"\nendpoint_url = "http://file"\n')
    cfg = load_config(file=path, env={"AWS_ENDPOINT_URL": "http://env", "AWS_REGION": "r"})
    assert cfg.endpoint_url == "http://env"


# --- load_config: errors -------------------------------------------------------------------------


def test_missing_origin_says_how_to_give_it():
    with pytest.raises(ConfigError) as info:
        load_config(env=AWS)
    msg = str(info.value)
    assert "origin is required" in msg
    assert "--origin" in msg and "COLDBREW_ORIGIN" in msg and "config file" in msg


def test_config_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        load_config(env=AWS)


def test_unknown_key_in_file_lists_the_known_keys(tmp_path):
    path = write_toml(tmp_path, 'origin = "s3://b"\ncache_sise = "1GiB"\nzzz = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(file=path, env=AWS)
    msg = str(info.value)
    assert "unknown key(s) cache_sise, zzz" in msg
    assert str(path) in msg
    known = msg.split("known keys:")[1]
    assert all(s.name in known for s in SETTINGS)


def test_unknown_key_inside_agent_table_is_reported(tmp_path):
    path = write_toml(tmp_path, '[agent]\norigin = "s3://b"\nchunksize = "1MiB"\n')
    with pytest.raises(ConfigError, match="unknown key\\(s\\) chunksize"):
        load_config(file=path, env=AWS)


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path):
    path = write_toml(tmp_path, 'origin = "s3://b\nthis is = = not toml\n')
    with pytest.raises(ConfigError) as info:
        load_config(file=path, env=AWS)
    assert "is not valid TOML" in str(info.value)
    assert str(path) in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(file=path, env=ORIGIN_ENV)


def test_bad_env_value_names_setting_and_variable():
    with pytest.raises(ConfigError) as info:
        load_config(env={**ORIGIN_ENV, "COLDBREW_CACHE_SIZE": "12 parsecs"})
    msg = str(info.value)
    assert msg.startswith("cache_size: ")
    assert "'12 parsecs'" in msg
    assert msg.endswith("(from COLDBREW_CACHE_SIZE)")


def test_bad_flag_value_names_setting_and_flag():
    with pytest.raises(ConfigError) as info:
        load_config(env=ORIGIN_ENV, flags={"cache_size": "lots"})
    msg = str(info.value)
    assert msg.startswith("cache_size: ")
    assert msg.endswith("(from --cache-size)")


def test_bad_file_value_names_setting_and_file(tmp_path):
    path = write_toml(tmp_path, 'origin = "s3://b"\nchunk_size = "3MiB"\n')
    with pytest.raises(ConfigError) as info:
        load_config(file=path, env=AWS)
    msg = str(info.value)
    assert msg.startswith("chunk_size: ")
    assert "power of two" in msg
    assert msg.endswith(f"(from config file {path})")


def test_bad_alias_value_names_the_alias_variable():
    with pytest.raises(ConfigError, match=r"origin: .* \(from COLDBREW_ORIGIN\)"):
        load_config(env={**AWS, "COLDBREW_ORIGIN": "relative/path"})


def test_a_bad_file_value_is_not_reported_when_env_overrides_it(tmp_path):
    path = write_toml(tmp_path, 'origin = "s3://b"\ncache_size = "bogus"\n')
    cfg = load_config(file=path, env={**AWS, "COLDBREW_CACHE_SIZE": "1GiB"})
    assert cfg.cache_size == SizeOrPercent(bytes=GiB)


@pytest.mark.parametrize("name, env_value, fragment", [
    ("fetch_concurrency", "0", "must be greater than 0"),
    ("fetch_concurrency", "-3", "must be greater than 0"),
    ("retry_attempts", "many", "many"),
    ("retry_base_delay_s", "0", "must be greater than 0"),
    ("read_timeout_s", "-1.5", "must be greater than 0"),
    ("anonymous", "maybe", "is not a boolean"),
    ("check_origin", "perhaps", "is not a boolean"),
    ("metrics_address", "9400", "is not host:port"),
    ("log_format", "xml", "is not one of json, text"),
    ("log_level", "loud", "is not one of DEBUG, INFO, WARNING, ERROR"),
    ("cache_reserve", "200%", "between 0% and 100%"),
    ("chunk_size", "16MB", "power of two"),
])
def test_each_bad_env_value_is_a_config_error_naming_its_source(name, env_value, fragment):
    var = "COLDBREW_" + name.upper()
    with pytest.raises(ConfigError) as info:
        load_config(env={**ORIGIN_ENV, var: env_value})
    msg = str(info.value)
    assert msg.startswith(f"{name}: ")
    assert fragment in msg
    assert msg.endswith(f"(from {var})")


def test_wrong_toml_type_is_a_config_error(tmp_path):
    path = write_toml(tmp_path, 'origin = "s3://b"\nfetch_concurrency = [1, 2]\n')
    with pytest.raises(ConfigError, match=r"^fetch_concurrency: .*\(from config file "):
        load_config(file=path, env=AWS)


def test_config_is_frozen():
    cfg = load_config(env=ORIGIN_ENV)
    with pytest.raises(AttributeError):
        cfg.chunk_size = 1  # type: ignore[misc]


def test_nan_is_not_a_valid_timeout():
    with pytest.raises(ConfigError, match=r"read_timeout_s: .*\(from COLDBREW_READ_TIMEOUT_S\)"):
        load_config(env={**ORIGIN_ENV, "COLDBREW_READ_TIMEOUT_S": "nan"})


def test_top_level_keys_beside_an_agent_table_are_not_silently_dropped(tmp_path):
    path = write_toml(tmp_path, 'origin = "s3://top"\n\n[agent]\nchunk_size = "1MiB"\n')
    try:
        cfg = load_config(file=path, env=AWS)
    except ConfigError as e:  # rejecting the mixed form loudly is fine too
        assert "origin is required" not in str(e)
    else:
        assert cfg.origin == "s3://top"


def test_endpoint_and_region_are_optional():
    cfg = load_config(env={"COLDBREW_ORIGIN": "s3://models"})
    assert cfg.endpoint_url is None
    assert cfg.region is None
