/* kd_config.h - INI run configuration, validated against a schema.
 *
 * Every key a config may hold is declared once in the schema (src/io/config.c)
 * with its type, default and one line of help; `distill run --help` prints
 * it. Unknown sections or keys and values of the wrong type are errors naming
 * the file, line and key. `--section.key=value` overrides on the command line
 * go through the same validation.
 */
#ifndef KD_CONFIG_H
#define KD_CONFIG_H
#include "kd.h"

typedef struct kd_config kd_config;

kd_config *kd_config_new(void); /* all defaults */
void kd_config_free(kd_config *c);
/* Parses path (inih) into c. */
kd_status kd_config_load(kd_config *c, const char *path);
/* Parses an INI string (for tests); origin names it in errors. */
kd_status kd_config_load_string(kd_config *c, const char *text, const char *origin);
/* "section.key=value" from the command line. */
kd_status kd_config_override(kd_config *c, const char *assignment);
kd_status kd_config_set(kd_config *c, const char *section, const char *key, const char *value, const char *origin,
                        int line);

/* Typed reads; the value was validated when set, range errors name the key. */
int kd_config_int(const kd_config *c, const char *section, const char *key);
double kd_config_float(const kd_config *c, const char *section, const char *key);
const char *kd_config_str(const kd_config *c, const char *section, const char *key);
int kd_config_is_set(const kd_config *c, const char *section, const char *key); /* not a default */
/* Where the value came from: "default", "command line" or the config file's path. */
const char *kd_config_origin(const kd_config *c, const char *section, const char *key);
/* Error naming where section.key was set: "FILE:LINE: [train] lr: MESSAGE". */
kd_status kd_config_error(const kd_config *c, const char *section, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Writes the resolved config (every key, with its value) as INI. */
kd_status kd_config_write(const kd_config *c, const char *path);
/* The text kd_config_write writes; the caller frees it. */
char *kd_config_text(const kd_config *c);
/* Prints the schema as help text. */
void kd_config_print_schema(FILE *f);

#endif
