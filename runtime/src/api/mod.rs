//! Wire formats that applications speak to Glimpse, parsed apart from any transport so that
//! the server, the fuzz targets and the tests share one parser: OpenAI's chat completions
//! ([`openai`]).

pub mod openai;
